"""The data audit: what is in a stage's data before hours of training.

    python -m align.data audit RECIPE.yaml [key=value ...] [--out DIR] [--clean DIR]

A stage recipe (sft, rm, dpo, ppo, grpo) or a pipeline recipe (every stage's data, and the evaluation prompts). The
audit reads the data exactly as the stage does (`formats`: the same records, format, columns, offset/limit, skipped
rows and seeded validation split) and reports, naming every finding by file:line:

- records by file and detected format, and the records the stage skips (skip_invalid), by reason;
- exact duplicates (the same canonical text: every message, role and content, joined) and near duplicates (word
  5-gram sets whose Jaccard similarity is at least audit.near_duplicate_threshold) within the training data;
- leaks: a held-out record (validation, PPO/GRPO held-out prompts, a pipeline's evaluation prompts) that is an exact
  or near duplicate of a training record. Compared at the held-out side's grain: a prompt is compared with the
  training records' prompts, a whole example with whole examples;
- empty responses (an assistant turn with no text: the records the stage skips for it, and empty earlier turns that
  the formats let through) and, with a tokenizer, token lengths (min/median/p90/p99/max) against the stage's
  max_length (max_prompt_length for PPO/GRPO) and how many examples truncation will cut;
- preference data: the share of pairs whose chosen response is longer (characters), and contradictory pairs (the same
  prompt with the same two responses preferred both ways);
- personal data in the input files: e-mail addresses, phone numbers (North American, or written with a leading +
  country code) and card numbers (13-19 digits, whole or in groups, that pass the Luhn check). Only counts and
  file:line numbers are reported, never the values. `--clean DIR` writes masked copies ([EMAIL], [PHONE], [CARD]),
  byte-identical elsewhere.

Libraries: `datasketch` (MinHash signatures and LSH) proposes near-duplicate candidates without comparing every pair;
the exact Jaccard similarity of the two shingle sets then decides, so a reported pair is at or above the threshold
(LSH may miss a pair just above it, rarely). Personal data is found with regular expressions on the files' text lines
(JSON escapes such as `\\n` before a value are handled), so --clean can mask in place and keep every other byte.

`audit_stage(cfg, stage, tokenizer)` is what a stage calls before training; `audit_pipeline(cfg)` and `main(argv)`
serve the command line. The last line the command prints is a JSON object with the counts (`AuditReport.counts`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from . import formats
from .config import (
    STAGES,
    AlignError,
    AuditConfig,
    ConfigError,
    PipelineConfig,
    load_config,
    read_yaml,
    stage_of_recipe,
)
from .formats import DataError, Origin, PreferenceExample, PromptExample, RankingExample, SFTExample

KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompt", "grpo": "prompt"}
"""What each stage reads its records as (the canonical examples of align/formats.py)."""
SHINGLE = 5  # words per shingle (AuditConfig.near_duplicate_threshold's docstring: word 5-grams)
NUM_PERM = 128  # MinHash permutations: the LSH's estimate is within ~0.05 of the Jaccard similarity
SHOWN = 20  # locations listed per finding in audit.md and the terminal (audit.json lists them all)
OWN_FILES = ("audit.md", "audit.json")


# --------------------------------------------------------------------------------------------------------------
# What the audit compares: one canonical example as text


@dataclass(frozen=True)
class Item:
    text: str
    """The whole example: every message as `role: content`, joined by blank lines (a plain-text example as it is)."""
    prompt: str
    """The messages before the response (a prompt example: all of it)."""
    origin: Origin


def _joined(messages: Sequence[dict]) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _responses(ex: Any) -> list[list[dict]]:
    if isinstance(ex, PreferenceExample):
        return [ex.chosen, ex.rejected]
    if isinstance(ex, RankingExample):
        return list(ex.responses)
    return []


def _sft_prompt(messages: list[dict]) -> list[dict]:
    """The turns before the conversation's final run of assistant turns (what it answers)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def as_item(ex: Any) -> Item:
    if isinstance(ex, SFTExample):
        if ex.messages is None:
            return Item(ex.text or "", ex.text or "", ex.origin)
        return Item(_joined(ex.messages), _joined(_sft_prompt(ex.messages)), ex.origin)
    if isinstance(ex, PromptExample):
        text = _joined(ex.prompt)
        return Item(text, text, ex.origin)
    prompt = _joined(ex.prompt)
    return Item("\n\n".join([prompt] + [_joined(r) for r in _responses(ex)]), prompt, ex.origin)


# --------------------------------------------------------------------------------------------------------------
# Duplicates and leaks


@dataclass
class Match:
    at: str
    """file:line of the record that repeats (the later one; for a leak, the held-out one)."""
    other: str
    """file:line of the record it repeats (for a leak, the training record)."""
    kind: str = "exact"
    """exact | near."""
    similarity: float = 1.0
    """Jaccard similarity of the two word 5-gram sets (1.0 for an exact duplicate)."""


def shingles(text: str) -> frozenset[str]:
    """Word 5-grams of the lower-cased words; a text of fewer words is one shingle (so it only matches itself)."""
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE:
        return frozenset([" ".join(words) or text.strip().lower()])
    return frozenset(map(" ".join, zip(*(words[i:] for i in range(SHINGLE)))))


_WORD = re.compile(r"\w+")


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Sketches:
    """Shingle sets and MinHash signatures by text, computed once per audit (a pipeline's stages often read the same
    file) and in bulk (datasketch applies the permutations to a text's shingle hashes in one numpy pass)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[frozenset, Any]] = {}

    def get(self, texts: Sequence[str]) -> list[tuple[frozenset, Any]]:
        from datasketch import MinHash

        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        sets = [shingles(t) for t in new]
        # crc32 (C, deterministic) instead of datasketch's default sha1 wrapper: 3x faster, and its rare collisions
        # only cost LSH recall, since the exact Jaccard decides.
        signatures = MinHash.bulk([[s.encode("utf-8", "surrogateescape") for s in x] for x in sets],
                                  num_perm=NUM_PERM, hashfunc=zlib.crc32) if new else []
        self._cache.update(zip(new, zip(sets, signatures)))
        return [self._cache[t] for t in texts]


class Index:
    """Texts seen so far (the first record of each), with their shingle sets and an LSH over their signatures."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        # The LSH's own threshold is set a little lower, so that a pair whose MinHash estimate falls just under its
        # true similarity is still proposed; the exact Jaccard decides.
        self.lsh = MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=NUM_PERM)
        self.first: dict[str, Item] = {}
        self.items: list[Item] = []
        self.sets: list[frozenset] = []

    def add(self, key: str, item: Item, sset: frozenset, signature: Any) -> None:
        self.first[key] = item
        self.lsh.insert(len(self.items), signature)
        self.items.append(item)
        self.sets.append(sset)

    def nearest(self, sset: frozenset, signature: Any) -> Optional[tuple[Item, float]]:
        """The most similar text at or above the threshold (the earliest among equals), with its similarity."""
        scored = [(jaccard(sset, self.sets[c]), -c) for c in self.lsh.query(signature)]
        scored = [(sim, c) for sim, c in scored if sim >= self.threshold]
        if not scored:
            return None
        sim, neg = max(scored)
        return self.items[-neg], sim


def index_of(items: Sequence[Item], key: Callable[[Item], str], threshold: float, sketches: Sketches) -> Index:
    index = Index(threshold)
    unique = {}
    for it in items:
        unique.setdefault(key(it), it)
    for (k, it), (sset, sig) in zip(unique.items(), sketches.get(list(unique))):
        index.add(k, it, sset, sig)
    return index


def find_duplicates(items: Sequence[Item], threshold: float, sketches: Sketches
                    ) -> tuple[list[Match], list[Match], Index]:
    """(exact, near) duplicates within `items`, and the index of their texts. Each record that repeats an earlier one
    is listed once, with the first record it repeats; near duplicates leave out exact ones."""
    exact: list[Match] = []
    first: dict[str, Item] = {}
    for it in items:
        if it.text in first:
            exact.append(Match(str(it.origin), str(first[it.text].origin)))
        else:
            first[it.text] = it
    near: list[Match] = []
    index = Index(threshold)
    for (text, it), (sset, sig) in zip(first.items(), sketches.get(list(first))):
        best = index.nearest(sset, sig)
        if best is not None:
            near.append(Match(str(it.origin), str(best[0].origin), "near", round(best[1], 3)))
        index.add(text, it, sset, sig)
    return exact, near, index


def find_leaks(held: Sequence[Item], index: Index, sketches: Sketches, grain: str = "text") -> list[Match]:
    """Held-out records that are exact or near duplicates of a record in `index`, compared by `grain` (text: whole
    examples; prompt: prompts, with an index of the training records' prompts)."""
    keys = [it.prompt if grain == "prompt" else it.text for it in held]
    out = []
    for it, k, (sset, sig) in zip(held, keys, sketches.get(keys)):
        if k in index.first:
            out.append(Match(str(it.origin), str(index.first[k].origin)))
            continue
        best = index.nearest(sset, sig)
        if best is not None:
            out.append(Match(str(it.origin), str(best[0].origin), "near", round(best[1], 3)))
    return out


# --------------------------------------------------------------------------------------------------------------
# Preference pairs


@dataclass
class PreferenceStats:
    pairs: int
    """Ordered pairs: a pair, or every differently ranked pair of a ranking."""
    chosen_longer: int
    """Pairs whose chosen (better-ranked) response has more characters than the rejected one."""
    contradictory: list[Match]
    """The same prompt with the same two responses preferred both ways (listed once per such couple)."""

    @property
    def chosen_longer_share(self) -> Optional[float]:
        return round(self.chosen_longer / self.pairs, 4) if self.pairs else None


def preference_stats(examples: Sequence[Any]) -> PreferenceStats:
    pairs: list[tuple[str, str, str, int, int, Optional[Origin]]] = []
    for ex in examples:
        responses = _responses(ex)
        ranks = [0.0, 1.0] if isinstance(ex, PreferenceExample) else list(ex.ranks)
        prompt = _joined(ex.prompt)
        for i in range(len(responses)):
            for j in range(len(responses)):
                if ranks[i] < ranks[j]:  # i is preferred to j; ties give no pair
                    a, b = responses[i], responses[j]
                    pairs.append((prompt, _joined(a), _joined(b), _chars(a), _chars(b), ex.origin))
    seen: dict[tuple[str, str, str], Optional[Origin]] = {}
    contradictory, reported = [], set()
    for prompt, a, b, _, _, origin in pairs:
        other = seen.get((prompt, b, a))
        couple = (prompt, min(a, b), max(a, b))
        if (prompt, b, a) in seen and couple not in reported:
            reported.add(couple)
            contradictory.append(Match(str(origin), str(other)))
        seen.setdefault((prompt, a, b), origin)
    return PreferenceStats(len(pairs), sum(ca > cb for _, _, _, ca, cb, _ in pairs), contradictory)


def _chars(messages: Sequence[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


# --------------------------------------------------------------------------------------------------------------
# Empty responses and token lengths


# The reasons formats gives for a record whose response is empty (a message's content may be empty only when it is not
# the assistant's, so an empty `.content` is an assistant's).
EMPTY_RESPONSE = re.compile(r"empty response|field '(chosen|rejected|completion|output|answer|response|"
                            r"responses\[\d+\]|[^']*\.content|[^']*\.value)' is empty")


def empty_turns(examples: Sequence[Any]) -> list[str]:
    """file:line of examples with an assistant turn that holds no text (the formats reject an empty final reply;
    an empty earlier turn of a transcript passes through to training)."""
    out = []
    for ex in examples:
        if isinstance(ex, SFTExample):
            turns = ex.messages or []
        elif isinstance(ex, PromptExample):
            turns = ex.prompt
        else:
            turns = list(ex.prompt) + [m for r in _responses(ex) for m in r]
        if any(m["role"] == "assistant" and not m["content"].strip() for m in turns):
            out.append(str(ex.origin))
    return out


@dataclass
class Lengths:
    what: str
    """What was measured (e.g. "prompt + response tokens, the longer response of a pair")."""
    limit: int
    """The stage's max_length (max_prompt_length for PPO/GRPO)."""
    rule: str
    """What the stage does with a longer example (data.truncation)."""
    examples: int
    min: int
    median: int
    p90: int
    p99: int
    max: int
    over: list[str] = field(default_factory=list)
    """file:line of every example longer than `limit`: truncation cuts (or drops, or stops at) these."""


def _rank(values: Sequence[int], q: float) -> int:
    """The nearest-rank q-th percentile of sorted values."""
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def token_lengths(stage: str, cfg: Any, examples: Sequence[Any], tokenizer) -> Lengths:
    """Each example's token length as the stage tokenizes it (its template, system prompt and tokenizer), before
    truncation: SFT the conversation; DPO each response after its prompt (the longer of the pair); a reward model each
    (prompt, response) it scores (the longest); PPO/GRPO the prompt with its generation prompt. The same texts as
    align/data.py's tokenize_* functions, encoded in batches (several times faster than one by one)."""
    from . import data

    d = cfg.data
    owner: list[int] = []  # the example of each sequence
    texts: list[Any] = []  # a text, or a (prompt, response) pair of texts for an encoder
    special, eos = False, False  # add the tokenizer's special tokens; end with EOS (as the plain templates do)

    def add(i: int, text: Any) -> None:
        owner.append(i)
        texts.append(text)

    if stage == "sft":
        exs = formats.with_system_prompt(list(examples), d.system_prompt) if d.system_prompt else examples
        if any(ex.text is not None for ex in exs):
            special, eos = True, True
        else:
            data.require_chat_template(tokenizer)
        for i, ex in enumerate(exs):
            add(i, ex.text if ex.text is not None else data.render(tokenizer, ex.messages))
        what, limit = "tokens of the templated conversation", d.max_length
    elif stage in ("dpo", "rm"):
        resolve = data.resolve_policy_template if stage == "dpo" else data.resolve_template
        template = resolve(tokenizer, d.template)
        special = eos = template == "plain"
        for i, ex in enumerate(examples):
            for r in _responses(ex):
                if template == "chat":
                    add(i, data.render(tokenizer, list(ex.prompt) + list(r)))
                elif template == "plain":
                    add(i, data.plain_text(list(ex.prompt) + list(r)))
                else:  # pair: an encoder's sentence pair
                    special = True
                    add(i, (data.plain_text(ex.prompt), data.plain_text(r)))
        longest = "the longer response" if stage == "dpo" else "the longest response"
        what, limit = f"prompt + response tokens ({template} template; {longest})", d.max_length
    else:
        template = data.resolve_policy_template(tokenizer, d.template)
        special = template != "chat"
        for i, ex in enumerate(examples):
            messages = data.with_system_prompt(ex.prompt, d.system_prompt)
            add(i, data.render(tokenizer, messages, add_generation_prompt=True) if template == "chat"
                else data.plain_text(messages) + "\n\nAssistant:")
        what, limit = f"prompt tokens ({template} template, with the generation prompt)", d.max_prompt_length
    lengths = [0] * len(examples)
    for i, n in zip(owner, _encoded_lengths(tokenizer, texts, special, eos)):
        lengths[i] = max(lengths[i], n)
    ordered = sorted(lengths)
    over = [str(ex.origin) for ex, n in zip(examples, lengths) if n > limit]
    return Lengths(what, limit, d.truncation, len(lengths), ordered[0], _rank(ordered, 50), _rank(ordered, 90),
                   _rank(ordered, 99), ordered[-1], over)


def _encoded_lengths(tokenizer, texts: Sequence[Any], special: bool, eos: bool, batch: int = 1024) -> list[int]:
    out = []
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        if chunk and isinstance(chunk[0], tuple):
            ids = tokenizer([a for a, _ in chunk], [b for _, b in chunk], add_special_tokens=special)["input_ids"]
        else:
            ids = tokenizer(list(chunk), add_special_tokens=special)["input_ids"]
        end = tokenizer.eos_token_id
        out += [len(x) + (eos and end is not None and (not x or x[-1] != end)) for x in ids]
    return out


# --------------------------------------------------------------------------------------------------------------
# Personal data: found in the files' text, masked in place


@dataclass(frozen=True)
class Pattern:
    kind: str
    mask: str
    regex: re.Pattern
    valid: Callable[[str], bool] = lambda s: True


# A value may follow a JSON escape (`\n555-123-4567` in a JSONL line): the escape's letter is then not part of it.
_AFTER_ESCAPE = r"(?<=\\[nrtbf])"


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _international(text: str) -> bool:
    return 8 <= len(re.sub(r"\D", "", text)) <= 15


# In the order they are looked for: a span found by an earlier pattern is not searched again (a card number is not
# also a phone number).
PATTERNS = (
    Pattern("card", "[CARD]", re.compile(
        rf"(?:{_AFTER_ESCAPE}|(?<![\w\\.,]))"
        r"(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,4}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{5})(?![\d])"), _card),
    Pattern("email", "[EMAIL]", re.compile(
        rf"(?:{_AFTER_ESCAPE}|(?<![\w.%+\-\\]))"
        r"[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])")),
    Pattern("phone", "[PHONE]", re.compile(  # North American: (555) 123-4567, 555-123-4567, +1 555.123.4567
        rf"(?:{_AFTER_ESCAPE}|(?<![\w\\+.]))"
        r"(?:\+1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d])")),
    Pattern("phone", "[PHONE]", re.compile(  # with a country code: +44 20 7946 0958, +49-30-123456
        rf"(?:{_AFTER_ESCAPE}|(?<![\w\\+.]))"
        r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\d])"), _international),
)
PERSONAL_KINDS = ("email", "phone", "card")


# Where a card or phone number can be: 10 or more digits and separators. Found in one cheap pass, so the patterns
# (whose look-behinds make the regex engine try every position) only run inside these windows: numbers are everywhere
# in math data, and the whole-line patterns cost ~5x more there.
_WINDOW = re.compile(r"[\d(+][\d ().+-]{9,}")


def find_personal(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every personal-data value in `text`, non-overlapping, in order."""
    windows = [m.span() for m in _WINDOW.finditer(text)]
    found: list[tuple[str, int, int]] = []
    for pattern in PATTERNS:
        if pattern.kind == "email":
            matches: Iterable[re.Match] = pattern.regex.finditer(text) if "@" in text else ()
        else:  # a look-behind still sees the characters before its window
            matches = (m for a, b in windows for m in pattern.regex.finditer(text, a, b))
        for m in matches:
            start, end = m.span()
            if pattern.valid(m.group()) and not any(s < end and start < e for _, s, e in found):
                found.append((pattern.kind, start, end))
    return sorted(found, key=lambda f: f[1])


def mask_personal(text: str) -> str:
    """`text` with every personal-data value replaced by its mask; every other character kept."""
    masks = {p.kind: p.mask for p in PATTERNS}
    out, at = [], 0
    for kind, start, end in find_personal(text):
        out.append(text[at:start])
        out.append(masks[kind])
        at = end
    out.append(text[at:])
    return "".join(out)


@dataclass
class PersonalData:
    file: str
    unit: str
    """line (a text file's lines) or row (records of a parquet file or `datasets` path)."""
    found: dict[str, list[int]]
    """kind -> the line (or row) number of each value found; a line holding two values is listed twice."""

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.found.values())


def is_text_file(path: str) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv")


def read_text(path: str) -> str:
    """A text file's exact content as str: bytes that are not UTF-8 (and a byte-order mark) survive a round trip."""
    return Path(path).read_bytes().decode("utf-8", "surrogateescape")


def scan_file(path: str, split: str = "train", lines: Optional[set[int]] = None) -> PersonalData:
    """Personal data in a file, by line (text files) or row. `lines`: for a JSONL file, count only these lines (the
    records a recipe reads: offset/limit); other files are counted whole (a record may span lines there)."""
    found: dict[str, list[int]] = {k: [] for k in PERSONAL_KINDS}
    if is_text_file(path):
        only = lines if lines is not None and Path(path).suffix.lower() == ".jsonl" else None
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if only is not None and lineno not in only:
                continue
            for kind, _, _ in find_personal(line):
                found[kind].append(lineno)
        return PersonalData(path, "line", found)
    for record in formats.read_records(path, split):  # parquet, `datasets`: the values of each row
        for value in _strings(record.data):
            for kind, _, _ in find_personal(value):
                found[kind].append(record.origin.line)
    return PersonalData(path, "row", found)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def clean_targets(paths: Sequence[str], folder: Path) -> list[tuple[str, Path]]:
    """(input, masked copy) for each text input file; raises ConfigError if a copy would replace an existing file or
    two inputs share a file name."""
    out, names = [], {}
    for path in paths:
        if not is_text_file(path):
            continue  # parquet / `datasets`: reported, not copied
        target = Path(folder) / Path(path).name
        if target.name in names:
            raise ConfigError(f"--clean {folder}: {path} and {names[target.name]} would both be copied to {target}")
        names[target.name] = path
        if target.exists():
            raise ConfigError(f"--clean {folder}: {target} exists; the audit never overwrites a file")
        out.append((path, target))
    return out


def write_clean(targets: Sequence[tuple[str, Path]]) -> None:
    for source, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.write_bytes(mask_personal(read_text(source)).encode("utf-8", "surrogateescape"))
        tmp.replace(target)


# --------------------------------------------------------------------------------------------------------------
# Reading a stage's data as the stage does


@dataclass
class FileEntry:
    stage: str
    role: str
    """train | validation | evaluation."""
    path: str
    format: str
    """The detected (or named) format, e.g. hh, preference, question_answer."""
    records: int
    examples: int
    skipped: dict[str, int] = field(default_factory=dict)
    """Records the stage leaves out (data.*.skip_invalid), by reason."""
    split: str = "train"
    """The split read, for a `datasets` path."""
    lines: list[int] = field(default_factory=list, repr=False)
    """The line (row) of each record read: a JSONL file's personal-data count covers these records only."""


@dataclass
class Loaded:
    entry: FileEntry
    examples: list
    skipped_at: list[tuple[str, str]]
    """(file:line, reason) of each skipped record."""


def load_source(source: Any, kind: str, stage: str, role: str) -> Loaded:
    """A DataSource read and converted as formats.load_examples does, keeping where each skipped record was."""
    records = formats.read_records(source.path, source.split, source.limit, source.columns, source.offset)
    name = formats.get_format(source.format, records[0], kind).name
    examples = formats.convert_records(records, source.format, kind, source.skip_invalid)
    return Loaded(FileEntry(stage, role, source.path, name, len(records), len(examples), examples.skipped,
                            source.split, [r.origin.line for r in records]), list(examples), examples.skipped_at)


# --------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class StageAudit:
    stage: str
    kind: str
    train_examples: int
    validation_examples: int
    validation_from: str
    """Where held-out examples come from: a file, a seeded fraction of the training data, or none."""
    threshold: float
    exact_duplicates: list[Match] = field(default_factory=list)
    near_duplicates: list[Match] = field(default_factory=list)
    leaks: list[Match] = field(default_factory=list)
    """Validation (PPO/GRPO: held-out prompts) records found in the training data."""
    empty_responses: list[str] = field(default_factory=list)
    """file:line of records the stage skips for an empty response, and of examples with an empty assistant turn."""
    skipped: int = 0
    lengths: Optional[Lengths] = None
    lengths_note: Optional[str] = None
    """Why token lengths were not measured (no tokenizer, or the template failed)."""
    preference: Optional[PreferenceStats] = None


@dataclass
class AuditReport:
    recipe: Optional[str]
    files: list[FileEntry]
    stages: list[StageAudit]
    personal: list[PersonalData]
    evaluation_leaks: list[Match] = field(default_factory=list)
    """A pipeline's evaluation prompts found in a stage's training prompts (see `Match.other` for which file)."""
    seconds: float = 0.0
    cleaned: list[str] = field(default_factory=list)
    """The masked copies --clean wrote."""

    @property
    def leaks(self) -> int:
        return sum(len(s.leaks) for s in self.stages) + len(self.evaluation_leaks)

    @property
    def counts(self) -> dict:
        """The audit's numbers: the JSON line, report.json's `audit` and the model card."""
        personal = Counter()
        for p in self.personal:
            personal.update({k: len(v) for k, v in p.found.items()})
        measured = [s.lengths for s in self.stages if s.lengths is not None]
        prefs = [s.preference for s in self.stages if s.preference is not None and s.preference.pairs]
        pairs = sum(p.pairs for p in prefs)
        return {
            "records": sum(f.records for f in self.files),
            "files": len({f.path for f in self.files}),
            "skipped": sum(s.skipped for s in self.stages),
            "exact_duplicates": sum(len(s.exact_duplicates) for s in self.stages),
            "near_duplicates": sum(len(s.near_duplicates) for s in self.stages),
            "leaks": self.leaks,
            "contradictory_pairs": sum(len(p.contradictory) for p in prefs),
            "empty_responses": sum(len(s.empty_responses) for s in self.stages),
            "truncated": sum(len(x.over) for x in measured) if measured else None,
            "personal_data": sum(personal.values()),
            "emails": personal["email"],
            "phone_numbers": personal["phone"],
            "card_numbers": personal["card"],
            "chosen_longer_share": round(sum(p.chosen_longer for p in prefs) / pairs, 4) if pairs else None,
        }

    def summary(self) -> str:
        c = self.counts
        line = (f"data audit: {c['records']} records in {c['files']} file(s): {c['exact_duplicates']} exact and "
                f"{c['near_duplicates']} near duplicates, {c['leaks']} leaks, {c['contradictory_pairs']} contradictory "
                f"pairs, {c['empty_responses']} empty responses, {c['personal_data']} personal-data values")
        details = []
        if c["truncated"] is not None:
            details.append(f"{c['truncated']} examples longer than the stage's limit")
        if c["chosen_longer_share"] is not None:
            details.append(f"chosen response longer in {c['chosen_longer_share']:.0%} of pairs")
        if c["skipped"]:
            details.append(f"{c['skipped']} records skipped")
        return line + ("\n  " + "; ".join(details) if details else "")

    def as_dict(self) -> dict:
        return {"counts": self.counts, "recipe": self.recipe, "seconds": round(self.seconds, 3),
                "files": [{k: v for k, v in asdict(f).items() if k != "lines"} for f in self.files],
                "stages": [_stage_dict(s) for s in self.stages],
                "evaluation_leaks": [asdict(m) for m in self.evaluation_leaks],
                "personal_data": [{"file": p.file, "unit": p.unit, "found": p.found} for p in self.personal]}

    def markdown(self) -> str:
        return render_markdown(self)

    def write(self, folder: Path) -> None:
        """audit.md and audit.json in `folder`, each written atomically."""
        from . import train  # train integrates the audit: imported here, not at the top

        folder = Path(folder)
        train.make_dir(folder, "audit folder")
        train.write_text_atomic(folder / "audit.md", self.markdown())
        train.write_json_atomic(folder / "audit.json", self.as_dict())


def _stage_dict(s: StageAudit) -> dict:
    out = asdict(s)
    if s.preference is not None:
        out["preference"]["chosen_longer_share"] = s.preference.chosen_longer_share
    return out


def _where(items: Sequence[str], limit: int = SHOWN) -> str:
    """The first `limit` locations, a file named once for its run of lines: `a.jsonl:3, 9, 12; b.jsonl:4`."""
    parts: list[str] = []
    last = None
    for item in items[:limit]:
        file, _, line = item.rpartition(":")
        if file and line.isdigit() and file == last:
            parts[-1] += f", {line}"
        else:
            parts.append(item)
        last = file if line.isdigit() else None
    shown = "; ".join(parts)
    return shown + (f" ... and {len(items) - limit} more (audit.json lists all)" if len(items) > limit else "")


def _matches(matches: Sequence[Match], limit: int = SHOWN) -> str:
    parts = [f"{m.at} = {m.other}" if m.kind == "exact" else f"{m.at} ~ {m.other} ({m.similarity:.2f})"
             for m in matches[:limit]]
    more = f" ... and {len(matches) - limit} more (audit.json lists all)" if len(matches) > limit else ""
    return "; ".join(parts) + more


def _lines(numbers: Sequence[int], limit: int = SHOWN) -> str:
    unique = sorted(set(numbers))
    more = f" ... and {len(unique) - limit} more (audit.json lists all)" if len(unique) > limit else ""
    return ", ".join(map(str, unique[:limit])) + more


def render_markdown(report: AuditReport) -> str:
    c = report.counts
    out = ["# Data audit", ""]
    if report.recipe:
        out.append(f"Recipe: `{report.recipe}`. ")
    out += [report.summary().replace("\n  ", "; ") + ".", "", "## Files", "",
            "| stage | role | file | format | records | examples | skipped |", "|---|---|---|---|---:|---:|---:|"]
    for f in report.files:
        skipped = sum(f.skipped.values())
        out.append(f"| {f.stage} | {f.role} | `{f.path}` | {f.format} | {f.records} | {f.examples} | {skipped} |")
    out += ["", "## Counts", "", "| | |", "|---|---:|"]
    out += [f"| {k} | {'n/a' if v is None else v} |" for k, v in c.items()]
    for s in report.stages:
        out += ["", f"## Stage {s.stage}", "",
                f"- {s.train_examples} training examples ({s.kind}); held out: {s.validation_examples} "
                f"({s.validation_from})"]
        for name, found in (("exact duplicates", s.exact_duplicates), ("near duplicates", s.near_duplicates)):
            extra = f" (Jaccard of word {SHINGLE}-grams >= {s.threshold})" if name.startswith("near") else ""
            out.append(f"- {name}{extra}: {len(found)}" + (f": {_matches(found)}" if found else ""))
        out.append(f"- leaks (held-out records found in the training data): {len(s.leaks)}"
                   + (f": {_matches(s.leaks)}" if s.leaks else ""))
        out.append(f"- empty responses: {len(s.empty_responses)}"
                   + (f": {_where(s.empty_responses)}" if s.empty_responses else ""))
        if s.skipped:
            out.append(f"- skipped records: {s.skipped}")
        if s.preference is not None:
            p = s.preference
            share = "n/a" if p.chosen_longer_share is None else f"{p.chosen_longer_share:.1%}"
            out.append(f"- preference pairs: {p.pairs}; chosen longer (characters): {share}; contradictory pairs: "
                       f"{len(p.contradictory)}" + (f": {_matches(p.contradictory)}" if p.contradictory else ""))
        if s.lengths is not None:
            n = s.lengths
            out.append(f"- token lengths ({n.what}) of {n.examples} examples: min {n.min}, median {n.median}, p90 "
                       f"{n.p90}, p99 {n.p99}, max {n.max}; {len(n.over)} longer than {n.limit} "
                       f"(truncation={n.rule})" + (f": {_where(n.over)}" if n.over else ""))
        else:
            out.append(f"- token lengths: not measured ({s.lengths_note})")
    if report.evaluation_leaks or any(f.role == "evaluation" for f in report.files):
        out += ["", "## Evaluation prompts", "",
                f"- found in a stage's training prompts: {len(report.evaluation_leaks)}"
                + (f": {_matches(report.evaluation_leaks)}" if report.evaluation_leaks else "")]
    out += ["", "## Personal data", "", "Counts and line numbers only; the values are never written. "
            "`--clean DIR` writes masked copies.", ""]
    if not any(p.total for p in report.personal):
        out.append("None found.")
    for p in report.personal:
        for kind in PERSONAL_KINDS:
            if p.found[kind]:
                out.append(f"- `{p.file}`: {len(p.found[kind])} {kind} ({p.unit}s {_lines(p.found[kind])})")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Auditing a stage, a pipeline


def _held_out(loaded: Loaded, cfg: Any) -> tuple[list, list, str]:
    """(train, validation, where validation comes from), split as formats.load_train_validation does."""
    d = cfg.data
    if d.validation is not None:
        return loaded.examples, [], f"file {d.validation.path}"
    if d.validation_fraction > 0:
        train, validation = formats.split_validation(loaded.examples, d.validation_fraction, cfg.seed)
        return train, validation, f"validation_fraction={d.validation_fraction} of the training data, seed {cfg.seed}"
    return loaded.examples, [], "none"


def _audit_one(cfg: Any, stage: str, tokenizer, sketches: Sketches) -> tuple[StageAudit, list[FileEntry], list]:
    """One stage's findings, its files, and its training items (for the pipeline's evaluation check)."""
    if stage not in KIND:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(KIND)}")
    kind = KIND[stage]
    audit_cfg = getattr(cfg, "audit", None) or AuditConfig()
    threshold = audit_cfg.near_duplicate_threshold
    train_loaded = load_source(cfg.data.train, kind, stage, "train")
    train, validation, where = _held_out(train_loaded, cfg)
    files, loads = [train_loaded.entry], [train_loaded]
    if cfg.data.validation is not None:
        val_loaded = load_source(cfg.data.validation, kind, stage, "validation")
        validation = val_loaded.examples
        files.append(val_loaded.entry)
        loads.append(val_loaded)
    train_items = [as_item(ex) for ex in train]
    exact, near, index = find_duplicates(train_items, threshold, sketches)
    leaks = find_leaks([as_item(ex) for ex in validation], index, sketches)
    skipped_empty = [at for ld in loads for at, reason in ld.skipped_at if EMPTY_RESPONSE.search(reason)]
    report = StageAudit(stage, kind, len(train), len(validation), where, threshold, exact, near, leaks,
                        skipped_empty + empty_turns(list(train) + list(validation)),
                        sum(len(ld.skipped_at) for ld in loads))
    if kind == "preference":
        report.preference = preference_stats(train)
    if tokenizer is None:
        report.lengths_note = "no tokenizer"
    else:
        try:
            report.lengths = token_lengths(stage, cfg, list(train) + list(validation), tokenizer)
        except DataError as err:  # e.g. a template that is not prefix-preserving: the stage itself will say so
            report.lengths_note = str(err)
    return report, files, train_items


def audit_stage(cfg: Any, stage: str, tokenizer=None) -> AuditReport:
    """The audit of one stage's data (`cfg`: its SFTConfig, RMConfig, DPOConfig, PPOConfig or GRPOConfig), with token
    lengths when a tokenizer is given. Raises DataError (one line: file, line, field) on bad input."""
    start = time.perf_counter()
    report, files, _ = _audit_one(cfg, stage, tokenizer, Sketches())
    personal = [scan_file(p, s, lines) for p, s, lines in _unique_inputs(files)]
    return AuditReport(None, files, [report], personal, seconds=time.perf_counter() - start)


def _unique_inputs(files: Sequence[FileEntry]) -> list[tuple[str, str, set[int]]]:
    """(path, split, lines read) of each input file once (a file several stages read is scanned once, over the
    union of the records they read)."""
    seen: dict[str, tuple[str, str, set[int]]] = {}
    for f in files:
        key = str(Path(f.path).resolve()) if is_text_file(f.path) else f"{f.path}@{f.split}"
        seen.setdefault(key, (f.path, f.split, set()))[2].update(f.lines)
    return list(seen.values())


def audit_pipeline(cfg: PipelineConfig, where: str = "pipeline",
                   tokenizer_for: Optional[Callable[[str, Any, list[str]], Any]] = None) -> AuditReport:
    """Every stage's audit, plus the evaluation prompts checked against every stage's training prompts.
    `tokenizer_for(stage, stage_cfg, inputs)` gives a stage's tokenizer (or None)."""
    from .pipeline import plan

    start = time.perf_counter()
    sketches = Sketches()
    stages, files, trained = [], [], []
    planned = plan(cfg, where)
    for st in planned:
        tokenizer = tokenizer_for(st.name, st.cfg, st.inputs) if tokenizer_for else None
        report, stage_files, items = _audit_one(st.cfg, st.name, tokenizer, sketches)
        stages.append(report)
        files += stage_files
        trained.append((st, items))
    evaluation_leaks = []
    prompts = cfg.evaluate.prompts
    if prompts is not None:
        loaded = load_source(prompts, "prompt", "evaluate", "evaluation")
        files.append(loaded.entry)
        held = [as_item(ex) for ex in loaded.examples]
        for st, items in trained:
            prompts_seen = index_of(items, lambda it: it.prompt, st.cfg.audit.near_duplicate_threshold, sketches)
            evaluation_leaks += find_leaks(held, prompts_seen, sketches, grain="prompt")
    personal = [scan_file(p, s, lines) for p, s, lines in _unique_inputs(files)]
    return AuditReport(where, files, stages, personal, evaluation_leaks, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------
# Command line


def check_out_folder(folder: Path) -> None:
    """--out: a new folder, an empty one, or one that holds only an earlier audit's files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: a file, not a folder")
    if folder.is_dir():
        other = sorted(e.name for e in folder.iterdir() if e.name not in OWN_FILES)
        if other:
            raise ConfigError(f"--out {folder}: the folder holds other files ({other[0]}...); use a new or empty "
                              f"folder")


def _tokenizer_loader() -> Callable[[str, Any, list[str]], Any]:
    """Tokenizers by model, loaded once each. A stage that starts from the SFT stage's output (not trained yet)
    uses the SFT recipe's model. A tokenizer that cannot be loaded leaves the lengths unmeasured, with a warning."""
    from . import models

    cache: dict[str, Any] = {}
    sft_model: dict[str, Any] = {}

    def load(stage: str, cfg: Any, inputs: list[str]):
        model = sft_model.get("model") if "sft" in inputs else cfg.model
        if stage == "sft":
            sft_model["model"] = cfg.model
        key = repr(model)
        if key not in cache:
            try:
                cache[key] = models.load_tokenizer(model)
            except (AlignError, OSError, ValueError) as err:
                print(f"warning: {stage}: no tokenizer ({err}); token lengths are not measured", file=sys.stderr)
                cache[key] = None
        return cache[key]

    return load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align.data audit",
                                description="Audit a stage's (or a pipeline's) data before training.")
    p.add_argument("recipe", help="a stage recipe (sft/rm/dpo/ppo/grpo) or a pipeline recipe")
    p.add_argument("overrides", nargs="*", help="key=value settings on top of the recipe")
    p.add_argument("--out", type=Path, help="write audit.md and audit.json here (a new or empty folder)")
    p.add_argument("--clean", type=Path, help="write masked copies of the input files here (never overwrites)")
    p.add_argument("--stage", choices=sorted(STAGES), help="the recipe's stage, when its file name does not say")
    return p


def run(args: argparse.Namespace) -> AuditReport:
    """The audit the command line asks for: every check before anything is written."""
    if args.out is not None:
        check_out_folder(args.out)
    recipe = str(args.recipe)
    loader = _tokenizer_loader()
    if "stages" in read_yaml(recipe):
        cfg = load_config(PipelineConfig, recipe, args.overrides)
        report = audit_pipeline(cfg, recipe, loader)
    else:
        stage = args.stage or stage_of_recipe(recipe)
        if stage is None:
            raise ConfigError(f"{recipe}: cannot tell the stage from the file name (sft_*.yaml, dpo_*.yaml...); "
                              f"pass --stage")
        cfg = load_config(STAGES[stage], recipe, args.overrides)
        start = time.perf_counter()
        report = audit_stage(cfg, stage, loader(stage, cfg, []))
        report.recipe, report.seconds = recipe, time.perf_counter() - start
    targets = clean_targets([p.file for p in report.personal], args.clean) if args.clean is not None else []
    if args.out is not None:
        report.write(args.out)
    write_clean(targets)
    report.cleaned = [str(t) for _, t in targets]
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
    except AlignError as err:  # a bad recipe, bad data (formats.DataError): one line, nothing written
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown())
    for path in report.cleaned:
        print(f"masked copy: {path}")
    if args.out is not None:
        print(f"written: {Path(args.out) / 'audit.md'}, {Path(args.out) / 'audit.json'}")
    print(json.dumps(report.counts))
    sys.stdout.flush()
    return 0
