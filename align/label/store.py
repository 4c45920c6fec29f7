"""What people label, and the file their answers go to.

Items. A ranking item is a prompt with K responses (a candidates file, or sampled by align.label.sample); a
comparison item is a prompt with the candidate's and the baseline's response (align.evaluate's samples.jsonl). An
item's id is a hash of its prompt and responses, so answers find their item again after a restart even if the
file's order changed, and two copies of one item are one item.

The journal (--out). One JSON line per answer, in the ranking format align.rm and reward_models.evaluate read
as they are (or, for comparisons, one verdict per line), plus who answered, when, and in which order the
responses were shown. Each line is written with a single os.write on a file opened for appending, under a lock,
then fsync'ed, before the page moves on: killing the server loses nothing submitted, two annotators never
interleave a line, and a restart reads the file to continue where each annotator stopped. An flock on the file
keeps a second server off it. A file that holds anything else is never written to.

The queue. Items are offered in file order. An annotator gets the first item they have not answered or skipped
that still needs answers (--per-item annotators, default 1, each rank/verdict/flag counting one) and that no one
else is holding: an item shown to one annotator is held for them for HOLD_SECONDS, so that two people working at
once are not shown the same item when it needs one answer. An answer that arrives after the item got its answers
(a page left open past its hold) is still kept: a person's work is never thrown away, so an item may end with more.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import formats
from ..config import ConfigError, DataSource

log = logging.getLogger("align")

ANSWER_LABELS = {"rank": ("rank", "skip", "flag"), "compare": ("verdict", "skip", "flag")}
HOLD_SECONDS = 600.0
ANNOTATOR = re.compile(r"^[\w][\w .@-]{0,63}$")
MAX_RESPONSES = 9  # ranks 1-9, one key each


@dataclass
class Item:
    id: str
    prompt: list[dict]
    responses: list[Any]
    """As the source file gives them (text, or messages ending in the assistant's turn)."""
    policies: Optional[list[str]] = None
    """Who wrote each response: the policies (rank), or ["candidate", "baseline"] (compare)."""
    rewards: Optional[list[Optional[float]]] = None
    """compare: the judge's rewards for candidate and baseline, from the samples file."""

    @property
    def texts(self) -> list[str]:
        """What the page shows for each response."""
        return [text_of(r) for r in self.responses]


def text_of(response: Any) -> str:
    if isinstance(response, str):
        return response
    return "\n\n".join(m["content"] if m["role"] == "assistant" else f"[{m['role']}] {m['content']}"
                       for m in response)


def item_id(prompt: list[dict], responses: list[Any]) -> str:
    blob = json.dumps([prompt, responses], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def unique(items: list[Item], path: str) -> list[Item]:
    seen, out = set(), []
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            out.append(it)
    if len(out) < len(items):
        log.warning("%s: %d repeated items shown once", path, len(items) - len(out))
    return out


def ranking_items(path: str) -> list[Item]:
    """Items from a candidates file (`{"prompt", "responses"[, "policies"]}`); errors name file, line, field."""
    examples = formats.load_examples(DataSource(path=path), "candidates")
    for ex in examples:
        if len(ex.responses) > MAX_RESPONSES:
            raise formats.DataError(f"{ex.origin}: field 'responses': at most {MAX_RESPONSES} responses per prompt "
                                    f"(one rank key each), got {len(ex.responses)}")
    return unique([Item(item_id(ex.prompt, ex.responses), ex.prompt, ex.responses, ex.policies)
                   for ex in examples], path)


def comparison_items(path: str) -> tuple[list[Item], int]:
    """Items from align.evaluate's samples.jsonl, and how many rows were left out because both policies wrote the
    same text (nothing to judge; align.evaluate counts them as ties)."""
    examples = formats.load_examples(DataSource(path=path), "comparison")
    items = [Item(item_id(ex.prompt, [ex.candidate, ex.baseline]), ex.prompt, [ex.candidate, ex.baseline],
                  ["candidate", "baseline"], [ex.reward_candidate, ex.reward_baseline])
             for ex in examples if ex.candidate != ex.baseline]
    if not items:
        raise ConfigError(f"{path}: every row's candidate and baseline responses are the same text: nothing to judge")
    return unique(items, path), len(examples) - len(items)


def shown_order(item: Item, annotator: str) -> list[int]:
    """The blind order an annotator sees the responses in: shuffled, the same on every reload for them, and
    different between annotators."""
    order = list(range(len(item.responses)))
    random.Random(f"{item.id}:{annotator}").shuffle(order)
    return order


def check_annotator(name: str) -> str:
    name = name.strip()
    if not ANNOTATOR.match(name):
        raise ValueError("a name is 1 to 64 letters, digits, spaces or . @ - _, starting with a letter or digit")
    return name


# --------------------------------------------------------------------------------------------------------------
# The journal


class Journal:
    """The answers file. Open it with `open()` once every input has been checked: that creates it if needed."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = Path(path), kind
        self.answers = self._read()
        self._fd: Optional[int] = None
        self._lock = threading.Lock()

    def _read(self) -> list[dict]:
        p = self.path
        if p.is_dir():
            raise ConfigError(f"--out {p}: a folder; name a .jsonl file")
        if not p.exists():
            if not p.parent.is_dir():
                raise ConfigError(f"--out {p}: the folder {p.parent} does not exist")
            return []
        text = p.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):
            raise ConfigError(f"{p}:{text.count(chr(10)) + 1}: the last line is cut short (the file was being written "
                              f"by something else?); align.label appends only to a file of whole lines it wrote")
        answers = []
        labels = ANSWER_LABELS[self.kind]
        for n, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not (isinstance(record, dict) and record.get("label") in labels and "item" in record
                    and "annotator" in record):
                what = "ranking" if self.kind == "rank" else "comparison"
                raise ConfigError(f"{p}:{n}: not an align.label {what} answer (field 'label' one of {labels}, "
                                  f"'item', 'annotator'); choose another --out (the file was not touched)")
            answers.append(record)
        return answers

    def open(self) -> None:
        """Create (or continue) the file and lock it for this process."""
        self.created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ConfigError(f"--out {self.path}: another align.label server is writing it") from None

    def append(self, answer: dict) -> None:
        """Write one answer as one line, durably, before returning. On a failed or short write (a full disk) the
        file is cut back to its last whole line and the error raised: the page says so and nothing is recorded."""
        line = (json.dumps(answer, ensure_ascii=False) + "\n").encode()
        with self._lock:
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"{self.path}: only {written} of {len(line)} bytes written")
                os.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, size)
                raise
            self.answers.append(answer)

    def close(self, discard: bool = False) -> None:
        """Release the file; with `discard`, remove it if this run created it and wrote nothing (a run that stopped
        before its server started leaves nothing behind)."""
        if self._fd is None:
            return
        if discard and self.created and not self.answers and os.fstat(self._fd).st_size == 0:
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------------------------------------------
# Which item an annotator sees next


class Queue:
    def __init__(self, items: list[Item], answers: list[dict], per_item: int = 1, hold_seconds: float = HOLD_SECONDS):
        self.items, self.per_item, self.hold_seconds = items, per_item, hold_seconds
        self.by_id = {it.id: it for it in items}
        self.seen: dict[str, set[str]] = defaultdict(set)  # annotator -> items answered, skipped or flagged
        self.answered: dict[str, set[str]] = defaultdict(set)  # item -> annotators who ranked/judged/flagged it
        self.done_by: Counter = Counter()  # annotator -> answers (skips included)
        self.held: dict[str, dict[str, float]] = defaultdict(dict)  # item -> annotator -> hold expiry
        self._lock = threading.Lock()
        for a in answers:
            self._count(a)
        stale = sum(a["item"] not in self.by_id for a in answers)
        if stale:
            log.warning("%d answers in the file are for items not in this set (kept, not shown)", stale)

    def _count(self, answer: dict) -> None:
        who, item = answer["annotator"], answer["item"]
        if item not in self.seen[who]:
            self.done_by[who] += 1
        self.seen[who].add(item)
        if answer["label"] != "skip":
            self.answered[item].add(who)

    def record(self, answer: dict) -> None:
        with self._lock:
            self._count(answer)
            self.held[answer["item"]].pop(answer["annotator"], None)

    def next(self, annotator: str) -> Optional[Item]:
        """The item to show `annotator` now (held for them), or None when nothing is left for them."""
        now = time.monotonic()
        with self._lock:
            for it in self.items:
                if it.id in self.seen[annotator]:
                    continue
                holders = {a for a, until in self.held[it.id].items() if until > now and a != annotator}
                if len(self.answered[it.id]) + len(holders) >= self.per_item:
                    continue
                self.held[it.id][annotator] = now + self.hold_seconds
                return it
        return None

    def progress(self, annotator: str) -> dict:
        complete = sum(len(self.answered[it.id]) >= self.per_item for it in self.items)
        return {"mine": self.done_by[annotator], "complete": complete, "total": len(self.items)}
