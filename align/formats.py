"""Real-world record formats -> canonical examples.

A record (one JSON object, parquet row or `datasets` row) becomes one canonical example:

    SFTExample(messages)          chat, prompt/completion, alpaca, question/answer, HH-RLHF (the chosen transcript)
    SFTExample(text=...)          plain text (continued pre-training)
    PreferenceExample             prompt/chosen/rejected, HH-RLHF transcripts, chosen/rejected conversations
    RankingExample                {prompt, responses, ranks|scores}, OpenAssistant trees (one per ranked group)
    CandidatesExample             {prompt, responses[, policies]}: responses for people to rank (align.label rank)
    ComparisonExample             {prompt, candidate, baseline}: align.evaluate's samples.jsonl (align.label compare)

align.label writes rankings in the ranking format, one line per answer; its lines for an item the annotator skipped
or flagged (`"label": "skip"` or `"flag"`, no ranks) are counted as skipped records by reason, never trained on.

A prompt is a list of messages ending in a non-assistant turn; a response is a list of messages ending in an
assistant turn (usually one; several when two dialogues diverge before their last turn).

Every example remembers its `Origin` (file and line), so any later error (bad field, too long with truncation
off...) names where the record came from. Bad input raises `DataError` with one line: `FILE:LINE: field ...`.

Formats are detected from the first record's fields, or named in the recipe (`data.train.format`), with a
column mapping (`data.train.columns`, canonical name -> the file's name) for files that name things differently.

Files: JSONL, JSON (a list of records, or an object holding one list), parquet, CSV and TSV (`.csv`, `.tsv`), or
anything else `datasets.load_dataset` reads. Text files are UTF-8 (a byte-order mark at the start is fine).
A CSV/TSV file has a header row naming the fields, then one record per row; blank rows are skipped, a column with
an empty header (a pandas index) is ignored. Every cell is text: an empty cell is a missing field, a number
(`margin`) is written as text (`0.5`), and a list field (`responses`, `ranks`, `scores`, `messages`,
`conversations`) as a JSON list in the cell (`["Sure.", "No."]`, `[0, 1]`). Other cells are taken as they are: a
`prompt` cell is the user's text even if it looks like JSON. A record's line is the line its row starts on.

Numbers must be finite: NaN or infinite ranks, scores, margins or OpenAssistant ranks are errors.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .config import AlignError

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style `conversations: [{from, value}]` speakers.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


log = logging.getLogger("align")


class DataError(AlignError, ValueError):
    """Unusable input; the message is one line naming the file, the line and the field. `reason` is the same
    without the location, for counting skipped records by reason."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Origin:
    file: str
    line: int
    """1-based line of a JSONL file, or 1-based record/row number for other files."""
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file} {self.unit} {self.line}"


@dataclass
class Record:
    data: dict[str, Any]
    origin: Origin
    text_cells: bool = False
    """Every value is text (a CSV/TSV row): numbers and lists may be written as text (see the module docstring)."""


@dataclass
class SFTExample:
    messages: Optional[list[Message]] = None
    """A chat: system/user/assistant turns, loss on the assistant turns."""
    text: Optional[str] = None
    """Plain text (continued pre-training), loss on every token."""
    origin: Optional[Origin] = field(default=None, compare=False)


@dataclass
class PreferenceExample:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: Optional[float] = None
    """How much more `chosen` is preferred (Llama 2's margin); used by the Bradley-Terry loss when set."""
    origin: Optional[Origin] = field(default=None, compare=False)

    def as_ranking(self) -> "RankingExample":
        return RankingExample(self.prompt, [self.chosen, self.rejected], [0.0, 1.0], self.margin, self.origin)


@dataclass
class RankingExample:
    prompt: list[Message]
    responses: list[list[Message]]
    ranks: list[float]
    """Human ranks, lower is better; equal ranks are ties. A pair is ranks [0, 1]."""
    margin: Optional[float] = None
    """For a pair (K=2): the preference margin, if the data has one."""
    origin: Optional[Origin] = field(default=None, compare=False)


@dataclass
class CandidatesExample:
    """Responses to one prompt, not yet ranked: what people rank in align.label."""

    prompt: list[Message]
    responses: list[Any]
    """As the file gives them: text, or messages ending in the assistant's turn."""
    policies: Optional[list[str]] = None
    """Which policy wrote each response, when known."""
    origin: Optional[Origin] = field(default=None, compare=False)


@dataclass
class ComparisonExample:
    """One prompt answered by a candidate and a baseline policy (a row of align.evaluate's samples.jsonl)."""

    prompt: list[Message]
    candidate: str
    baseline: str
    reward_candidate: Optional[float] = None
    """The judge's scores, when the file has them."""
    reward_baseline: Optional[float] = None
    origin: Optional[Origin] = field(default=None, compare=False)


@dataclass
class PromptExample:
    """A prompt for on-policy training (PPO) or evaluation: the chat the policy answers."""

    prompt: list[Message]
    origin: Optional[Origin] = field(default=None, compare=False)


class Examples(list):
    """A list of canonical examples that also remembers how many records were skipped, by reason."""

    def __init__(self, items=(), skipped: Optional[dict] = None):
        super().__init__(items)
        self.skipped: dict[str, int] = dict(skipped or {})
        self.skipped_at: list[tuple[str, str]] = []
        """(file:line, reason) of each skipped record, where convert_records made the list (the data audit)."""


# --------------------------------------------------------------------------------------------------------------
# Reading files


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
"""Suffixes read as local files; any other path goes to `datasets.load_dataset`."""


def read_records(path: str, split: str = "train", limit: Optional[int] = None,
                 columns: Optional[dict[str, str]] = None, offset: int = 0) -> list[Record]:
    """The records of a file or `datasets` path from number `offset` on (at most `limit`), each with its origin.
    Raises DataError on an unreadable record, naming the line; on a missing file or an empty dataset (or slice),
    naming the file."""
    suffix = Path(path).suffix.lower()
    if suffix in FILE_SUFFIXES and Path(path).is_dir():
        raise DataError(f"{path}: a folder, not a file")
    if suffix in FILE_SUFFIXES and not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    stop = None if limit is None else offset + limit
    if suffix == ".jsonl":
        records = list(_read_jsonl(path, stop))
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(path, "\t" if suffix == ".tsv" else ",", stop)
    else:
        records = _read_datasets(path, split)
    records = records[offset:] if limit is None else records[offset: offset + limit]
    if not records:
        raise DataError(f"{path}: no records (empty dataset)" if not offset else
                        f"{path}: no records from offset={offset} on (the file is shorter)")
    if columns:
        records = [replace(r, data=_rename(r, columns)) for r in records]
    return records


# A byte that is not UTF-8 is read as a lone surrogate (errors="surrogateescape") rather than failing somewhere in
# the file's buffer, so that the error can name its line and column. "utf-8-sig" drops a byte-order mark at the
# start of the file (Windows editors write one), which would otherwise make the first record unreadable.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def open_text(path: str | Path, **kwargs):
    """A user's text file opened for reading as UTF-8; check what is read with `check_utf8`."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", **kwargs)


def check_utf8(path: str | Path, text: str, first_line: int = 1) -> None:
    """Raise DataError `FILE:LINE: not UTF-8 text (byte 0xNN at column C)` if `text` (read with `open_text`,
    starting at line `first_line` of the file) holds a byte that is not UTF-8."""
    found = _ESCAPED_BYTE.search(text)
    if found is None:
        return
    at = found.start()
    line = first_line + text.count("\n", 0, at)
    column = at - text.rfind("\n", 0, at)
    raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{ord(found.group()) - 0xDC00:02x} at column {column})")


def _read_jsonl(path: str, limit: Optional[int]) -> Iterator[Record]:
    with open_text(path) as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            check_utf8(path, line, lineno)
            if not line.strip():
                continue
            origin = Origin(path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{origin}: expected a JSON object, got {type(obj).__name__}")
            yield Record(obj, origin)
            n += 1
            if limit is not None and n >= limit:
                return


def _read_json(path: str) -> list[Record]:
    with open_text(path) as f:
        text = f.read()
    check_utf8(path, text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records")
    records = []
    for i, item in enumerate(obj):
        origin = Origin(path, i + 1, "record")
        if not isinstance(item, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, origin))
    return records


def _read_parquet(path: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a parquet file ({' '.join(str(err).split())})") from None
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the first such cell
        for i in range(table.num_rows):
            for name in table.column_names:
                try:
                    table.column(name).slice(i, 1).to_pylist()
                except UnicodeDecodeError as err:
                    raise DataError(f"{Origin(path, i + 1, 'row')}: field '{name}': not UTF-8 text "
                                    f"(byte 0x{err.object[err.start]:02x})") from None
        raise
    return [Record(r, Origin(path, i + 1, "row")) for i, r in enumerate(rows)]


def _read_csv(path: str, delimiter: str, limit: Optional[int]) -> list[Record]:
    """A header row, then a record per row (see the module docstring). A quoted cell may span lines, so a record's
    origin is the line its row starts on: one past the line the previous row ended on (`reader.line_num`)."""

    def lines(f) -> Iterator[str]:
        for lineno, line in enumerate(f, 1):  # the same lines, one for one, that csv counts in line_num
            check_utf8(path, line, lineno)
            yield line

    records: list[Record] = []
    with open_text(path, newline="") as f:  # newline="": csv itself reads line ends inside quoted cells
        reader = csv.reader(lines(f), delimiter=delimiter)
        header, end = None, 0
        try:
            for cells in reader:
                start, end = end + 1, reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue
                if header is None:
                    header = [cell.strip() for cell in cells]
                    named = [name for name in header if name]
                    if len(set(named)) < len(named):
                        twice = next(name for name in named if named.count(name) > 1)
                        raise DataError(f"{path}:{start}: column {twice!r} appears twice in the header")
                    continue
                origin = Origin(path, start)
                if len(cells) != len(header):
                    raise DataError(f"{origin}: {len(cells)} cells, but the header has {len(header)} columns")
                row = {name: cell if cell != "" else None for name, cell in zip(header, cells) if name}
                records.append(Record(row, origin, text_cells=True))
                if limit is not None and len(records) >= limit:
                    break
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed {Path(path).suffix[1:].upper()} ({err})") from None
    return records


def _read_datasets(path: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as err:  # datasets raises many types; the user needs the path and the reason
        raise DataError(f"{path}: cannot load with datasets.load_dataset(split={split!r}): {err}") from None
    return [Record(dict(row), Origin(path, i + 1, "row")) for i, row in enumerate(ds)]


def _rename(record: Record, columns: dict[str, str]) -> dict[str, Any]:
    data = dict(record.data)
    for canonical, theirs in columns.items():
        if theirs not in data:
            raise DataError(f"{record.origin}: missing field '{theirs}' (mapped to '{canonical}' by columns)")
        data[canonical] = data.pop(theirs)
    return data


# --------------------------------------------------------------------------------------------------------------
# Field access with errors that name the field


class NotAnswered(DataError):
    """An align.label line for an item the annotator skipped or flagged: no ranking, always counted as skipped."""


def _error(record: Record, reason: str) -> DataError:
    return DataError(f"{record.origin}: {reason}", reason)


def _field(record: Record, name: str, fmt: str) -> Any:
    if name not in record.data or record.data[name] is None:
        raise _error(record, f"missing field '{name}' (format {fmt}; rename columns with data.*.columns)")
    return record.data[name]


def _string(record: Record, name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _error(record, f"field '{name}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _error(record, f"field '{name}' is empty")
    return value


def _text_list(record: Record, name: str, value: Any) -> Any:
    """A list field as a CSV cell writes it: JSON text. Values of other files are left as they are."""
    if not (record.text_cells and isinstance(value, str)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise _error(record, f"field '{name}': expected a JSON list in the cell ({err.msg} at column {err.colno})"
                     ) from None


def _number(record: Record, name: str, value: Any) -> float:
    """A finite number (a CSV cell writes it as text). NaN and infinities are errors: json and parquet let them
    through, and a NaN rank orders nothing consistently (cyclic pairs) while an infinite margin is an infinite loss."""
    if record.text_cells and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _error(record, f"field '{name}': expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _error(record, f"field '{name}': expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        raise _error(record, f"field '{name}': not a finite number (too large)") from None
    if not math.isfinite(number):
        raise _error(record, f"field '{name}': not a finite number ({number})")
    return number


def _messages(record: Record, name: str, value: Any, sharegpt: bool = False) -> list[Message]:
    """A list of {role, content} (or ShareGPT {from, value}) turns, validated."""
    value = _text_list(record, name, value)
    if not isinstance(value, list) or not value:
        raise _error(record, f"field '{name}': expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise _error(record, f"field '{at}': expected an object with role and content")
        if sharegpt or ("from" in msg and "role" not in msg):
            speaker = msg.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise _error(record, f"field '{at}.from': unknown speaker {speaker!r}")
            role, content = SHAREGPT_ROLES[speaker], msg.get("value")
            content_at = f"{at}.value"
        else:
            role, content = msg.get("role"), msg.get("content")
            content_at = f"{at}.content"
            if role not in ROLES:
                raise _error(record, f"field '{at}.role': expected one of {'/'.join(ROLES)}, got {role!r}")
        if content is None:
            raise _error(record, f"missing field '{content_at}'")
        content = _string(record, content_at, content, allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(record: Record, name: str, value: Any) -> None:
    if not isinstance(value, (str, list)):
        raise _error(record, f"field '{name}': expected text or a list of messages, got {type(value).__name__}")


def _prompt(record: Record, name: str, value: Any) -> list[Message]:
    """A prompt given as a string (one user turn) or as messages."""
    _text_or_messages(record, name, value)
    if isinstance(value, str):
        return [{"role": "user", "content": _string(record, name, value)}]
    return _messages(record, name, value)


def _response(record: Record, name: str, value: Any) -> list[Message]:
    """A response given as a string (one assistant turn) or as messages."""
    _text_or_messages(record, name, value)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(record, name, value)}]
    msgs = _messages(record, name, value)
    if msgs[-1]["role"] != "assistant":
        raise _error(record, f"field '{name}': the last message must be the assistant's")
    return msgs


# --------------------------------------------------------------------------------------------------------------
# SFT formats


def _sft_messages(r: Record) -> SFTExample:
    sharegpt = "conversations" in r.data and "messages" not in r.data
    name = "conversations" if sharegpt else "messages"
    msgs = _messages(r, name, _field(r, name, "messages"), sharegpt=sharegpt)
    if not any(m["role"] == "assistant" for m in msgs):
        raise _error(r, f"field '{name}': no assistant message to learn from")
    return SFTExample(messages=msgs, origin=r.origin)


def _sft_prompt_completion(r: Record) -> SFTExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "prompt_completion"))
    completion = _response(r, "completion", _field(r, "completion", "prompt_completion"))
    return SFTExample(messages=prompt + completion, origin=r.origin)


def _optional_string(r: Record, name: str) -> str:
    value = r.data.get(name)
    return "" if value is None else _string(r, name, value, allow_empty=True)


def _sft_alpaca(r: Record) -> SFTExample:
    instruction = _string(r, "instruction", _field(r, "instruction", "alpaca"))
    # `input` and `system` are optional (missing or empty); when present they must be text.
    extra = _optional_string(r, "input")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _string(r, "output", _field(r, "output", "alpaca"))
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = _optional_string(r, "system")
    if system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return SFTExample(messages=msgs, origin=r.origin)


def _sft_question_answer(r: Record) -> SFTExample:
    question = _string(r, "question", _field(r, "question", "question_answer"))
    answer = _string(r, "answer", _field(r, "answer", "question_answer"))
    return SFTExample(
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}], origin=r.origin
    )


def _sft_hh(r: Record) -> SFTExample:
    """The preferred HH-RLHF transcript as a demonstration (SFT on the chosen replies, as the DPO paper does
    before preference training)."""
    raw = _field(r, "chosen", "hh")
    msgs = parse_hh(r, "chosen", raw) if isinstance(raw, str) else _messages(r, "chosen", raw)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise _error(r, "field 'chosen': the last turn must be a non-empty assistant reply")
    return SFTExample(messages=msgs, origin=r.origin)


def _sft_text(r: Record) -> SFTExample:
    return SFTExample(text=_string(r, "text", _field(r, "text", "text")), origin=r.origin)


# --------------------------------------------------------------------------------------------------------------
# Preference and ranking formats

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(record: Record, name: str, text: Any) -> list[Message]:
    """An HH-RLHF transcript (`\n\nHuman: ...\n\nAssistant: ...`) as messages."""
    text = _string(record, name, text, allow_empty=True)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _error(record, f"field '{name}': not an HH transcript (expected it to start with '\\n\\nHuman:')")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def split_shared_prompt(record: Record, a: list[Message], b: list[Message]
                        ) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, response_a, response_b) of two conversations that share a beginning.

    The prompt is the longest common run of whole turns, cut back so that it ends on a user turn (the turn an
    assistant answers). Usually the conversations differ only in the final assistant turn; when they diverge
    earlier, each response holds every turn from the divergence on."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise _error(record, "chosen and rejected share no prompt (no common user turn before they differ)")
    prompt, ra, rb = a[:k], a[k:], b[k:]
    if ra == rb:
        raise _error(record, "chosen and rejected are identical")
    for name, resp in (("chosen", ra), ("rejected", rb)):
        if not resp or resp[-1]["role"] != "assistant":
            raise _error(record, f"field '{name}': the response must end with an assistant turn")
        if not resp[-1]["content"].strip():
            raise _error(record, f"field '{name}': empty response")
    return prompt, ra, rb


def _margin(r: Record) -> Optional[float]:
    value = r.data.get("margin")
    return None if value is None else _number(r, "margin", value)


def _check_responses(r: Record, prompt: list[Message], responses: list[list[Message]], names: list[str]) -> None:
    for name, resp in zip(names, responses):
        if not resp[-1]["content"].strip():
            raise _error(r, f"field '{name}': empty response")
    if prompt[-1]["role"] == "assistant":
        raise _error(r, "field 'prompt': the prompt must end with a user (or system/tool) turn")


def _pref_explicit(r: Record) -> PreferenceExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "preference"))
    chosen = _response_allow_empty(r, "chosen", _field(r, "chosen", "preference"))
    rejected = _response_allow_empty(r, "rejected", _field(r, "rejected", "preference"))
    _check_responses(r, prompt, [chosen, rejected], ["chosen", "rejected"])
    if chosen == rejected:
        raise _error(r, "chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, _margin(r), r.origin)


def _pref_conversations(r: Record) -> PreferenceExample:
    """chosen/rejected as whole conversations: HH-RLHF transcript strings or message lists."""
    raw_c, raw_r = _field(r, "chosen", "hh"), _field(r, "rejected", "hh")
    if isinstance(raw_c, str):
        a, b = parse_hh(r, "chosen", raw_c), parse_hh(r, "rejected", raw_r)
    else:
        a, b = _messages(r, "chosen", raw_c), _messages(r, "rejected", raw_r)
    prompt, chosen, rejected = split_shared_prompt(r, a, b)
    return PreferenceExample(prompt, chosen, rejected, _margin(r), r.origin)


def _response_allow_empty(r: Record, name: str, value: Any) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(r, name, value, allow_empty=True)}]
    return _response(r, name, value)


def _ranking(r: Record) -> RankingExample:
    if r.data.get("label") in ("skip", "flag"):
        reason = "skipped by the annotator" if r.data["label"] == "skip" else "flagged by the annotator"
        raise NotAnswered(f"{r.origin}: {reason}", reason)
    prompt = _prompt(r, "prompt", _field(r, "prompt", "ranking"))
    raw = _text_list(r, "responses", _field(r, "responses", "ranking"))
    if not isinstance(raw, list):
        raise _error(r, "field 'responses': expected a list")
    if len(raw) < 2:
        raise _error(r, f"field 'responses': a ranking needs at least 2 responses, got {len(raw)}")
    responses = [_response_allow_empty(r, f"responses[{i}]", x) for i, x in enumerate(raw)]
    if "ranks" in r.data and r.data["ranks"] is not None:
        key, values, sign = "ranks", r.data["ranks"], 1.0
    elif "scores" in r.data and r.data["scores"] is not None:
        key, values, sign = "scores", r.data["scores"], -1.0  # a higher score is a better (lower) rank
    else:
        raise _error(r, "missing field 'ranks' (or 'scores') (format ranking)")
    values = _text_list(r, key, values)
    if not isinstance(values, list) or len(values) != len(raw):
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise _error(r, f"field '{key}': expected {len(raw)} numbers (one per response), got {got}")
    ranks = [sign * _number(r, f"{key}[{i}]", v) for i, v in enumerate(values)]
    _check_responses(r, prompt, responses, [f"responses[{i}]" for i in range(len(raw))])
    return RankingExample(prompt, responses, ranks, None, r.origin)


def _candidates(r: Record) -> CandidatesExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "candidates"))
    raw = _text_list(r, "responses", _field(r, "responses", "candidates"))
    if not isinstance(raw, list) or len(raw) < 2:
        raise _error(r, "field 'responses': expected a list of at least 2 responses")
    names = [f"responses[{i}]" for i in range(len(raw))]
    _check_responses(r, prompt, [_response(r, name, x) for name, x in zip(names, raw)], names)
    policies = _text_list(r, "policies", r.data.get("policies"))
    if policies is not None and (not isinstance(policies, list) or len(policies) != len(raw)
                                 or not all(isinstance(p, str) for p in policies)):
        raise _error(r, f"field 'policies': expected {len(raw)} strings (one per response)")
    return CandidatesExample(prompt, raw, policies, r.origin)


def _comparison(r: Record) -> ComparisonExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "comparison"))
    texts = [_string(r, name, _field(r, name, "comparison"), allow_empty=True) for name in ("candidate", "baseline")]
    rewards = [None if r.data.get(name) is None else _number(r, name, r.data[name])
               for name in ("reward_candidate", "reward_baseline")]
    return ComparisonExample(prompt, *texts, *rewards, r.origin)


def oasst_groups(root: dict) -> list[tuple[list[dict], list[dict]]]:
    """Walk an OpenAssistant tree: (path of messages from the root to a prompter message, its ranked assistant
    replies) for every prompter message with at least two ranked assistant replies, in depth-first order."""
    out = []

    def walk(node: dict, path: list[dict]) -> None:
        path = path + [node]
        ranked = [x for x in node.get("replies") or [] if x.get("rank") is not None and x.get("role") == "assistant"]
        if node.get("role") == "prompter" and len(ranked) >= 2:
            out.append((path, ranked))
        for reply in node.get("replies") or []:
            walk(reply, path)

    walk(root, [])
    return out


def _oasst_tree(r: Record) -> list[RankingExample]:
    """Every group of ranked sibling assistant replies in an OpenAssistant message tree becomes one ranking whose
    prompt is the conversation above it (prompter -> user)."""
    root = _field(r, "prompt", "oasst")
    if not isinstance(root, dict) or "text" not in root:
        raise _error(r, "field 'prompt': expected an OpenAssistant message (text, role, replies)")
    roles = {"prompter": "user", "assistant": "assistant"}
    out = []
    for path, ranked in oasst_groups(root):
        for node in path:
            if node.get("role") not in roles:
                raise _error(r, f"field 'role': expected prompter or assistant, got {node.get('role')!r}")
        prompt = [{"role": roles[n["role"]], "content": n.get("text") or ""} for n in path]
        responses = [[{"role": "assistant", "content": x.get("text") or ""}] for x in ranked]
        names = [f"reply {x.get('message_id', i)}" for i, x in enumerate(ranked)]
        _check_responses(r, prompt, responses, names)
        ranks = [_number(r, f"{name}.rank", x["rank"]) for name, x in zip(names, ranked)]
        out.append(RankingExample(prompt, responses, ranks, None, r.origin))
    return out


# --------------------------------------------------------------------------------------------------------------
# Prompt formats (PPO, evaluation): any record that carries a prompt. A conversation gives the turns before its
# last assistant turn, so SFT and preference files serve as prompt files too.


def _until_last_user(r: Record, name: str, msgs: list[Message]) -> list[Message]:
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in msgs):
        raise _error(r, f"field '{name}': no user turn to answer")
    return msgs


def prompt_response(r: Record) -> tuple[list[Message], list[Message]]:
    """A {prompt, response} row to score (reward_models.score): a prompt as the prompt formats take it, and a
    response as text (may be empty) or messages ending with the assistant's."""
    prompt = _prompt(r, "prompt", _field(r, "prompt", "prompt_response"))
    return prompt, _response_allow_empty(r, "response", _field(r, "response", "prompt_response"))


def _prompt_field(r: Record) -> PromptExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "prompt"))
    if prompt[-1]["role"] == "assistant":
        raise _error(r, "field 'prompt': the prompt must end with a user (or system/tool) turn")
    return PromptExample(prompt, r.origin)


def _prompt_messages(r: Record) -> PromptExample:
    sharegpt = "conversations" in r.data and "messages" not in r.data
    name = "conversations" if sharegpt else "messages"
    msgs = _messages(r, name, _field(r, name, "messages"), sharegpt=sharegpt)
    return PromptExample(_until_last_user(r, name, msgs), r.origin)


def _prompt_question(r: Record) -> PromptExample:
    question = _string(r, "question", _field(r, "question", "question_answer"))
    return PromptExample([{"role": "user", "content": question}], r.origin)


def _prompt_alpaca(r: Record) -> PromptExample:
    return PromptExample(_sft_alpaca(r).messages[:-1], r.origin)


def _prompt_hh(r: Record) -> PromptExample:
    raw = _field(r, "chosen", "hh")
    msgs = parse_hh(r, "chosen", raw) if isinstance(raw, str) else _messages(r, "chosen", raw)
    return PromptExample(_until_last_user(r, "chosen", msgs), r.origin)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str
    """What it becomes: sft (SFTExample), preference (PreferenceExample / RankingExample) or prompt
    (PromptExample)."""
    keys: tuple[str, ...]
    """Fields whose presence identifies the format (all of them)."""
    convert: Callable[[Record], Any]


# Detection tries these in order; the first whose keys are all present wins.
FORMATS: list[Format] = [
    Format("messages", "sft", ("messages",), _sft_messages),
    Format("sharegpt", "sft", ("conversations",), _sft_messages),
    Format("prompt_completion", "sft", ("prompt", "completion"), _sft_prompt_completion),
    Format("alpaca", "sft", ("instruction", "output"), _sft_alpaca),
    Format("question_answer", "sft", ("question", "answer"), _sft_question_answer),
    Format("text", "sft", ("text",), _sft_text),
    Format("hh", "sft", ("chosen",), _sft_hh),
    Format("preference", "preference", ("prompt", "chosen", "rejected"), _pref_explicit),
    Format("hh", "preference", ("chosen", "rejected"), _pref_conversations),
    Format("ranking", "preference", ("prompt", "responses"), _ranking),
    Format("oasst", "preference", ("message_tree_id", "prompt"), _oasst_tree),
    Format("prompt", "prompt", ("prompt",), _prompt_field),
    Format("messages", "prompt", ("messages",), _prompt_messages),
    Format("sharegpt", "prompt", ("conversations",), _prompt_messages),
    Format("question_answer", "prompt", ("question",), _prompt_question),
    Format("alpaca", "prompt", ("instruction",), _prompt_alpaca),
    Format("hh", "prompt", ("chosen",), _prompt_hh),
    Format("candidates", "candidates", ("prompt", "responses"), _candidates),
    Format("comparison", "comparison", ("prompt", "candidate", "baseline"), _comparison),
]
BY_NAME = {(f.name, f.kind): f for f in FORMATS}


def detect_format(record: Record, kind: str) -> Format:
    for fmt in FORMATS:
        if fmt.kind == kind and all(k in record.data for k in fmt.keys):
            return fmt
    known = "; ".join(f"{f.name} ({'+'.join(f.keys)})" for f in FORMATS if f.kind == kind)
    raise DataError(
        f"{record.origin}: cannot detect the format from fields {sorted(record.data)}; "
        f"expected one of: {known}. Name it with data.*.format and map columns with data.*.columns"
    )


def get_format(name: str, record: Record, kind: str) -> Format:
    if name == "auto":
        return detect_format(record, kind)
    if (name, kind) not in BY_NAME:
        options = ", ".join(f.name for f in FORMATS if f.kind == kind)
        raise DataError(f"{record.origin.file}: unknown {kind} format {name!r}; expected auto or one of {options}")
    return BY_NAME[(name, kind)]


def convert_records(records: list[Record], fmt_name: str, kind: str, skip_invalid: bool = False) -> Examples:
    """Canonical examples of `records` (a record may give several, e.g. an OpenAssistant tree). With
    skip_invalid, a record that fails validation is left out and counted by reason instead of stopping."""
    fmt = get_format(fmt_name, records[0], kind)
    out = Examples()
    for r in records:
        try:
            converted = fmt.convert(r)
        except DataError as err:
            if not skip_invalid and not isinstance(err, NotAnswered):  # align.label's skips and flags: never an error
                raise
            out.skipped_at.append((str(r.origin), err.reason))
            continue
        out.extend(converted if isinstance(converted, list) else [converted])
    skipped = Counter(reason for _, reason in out.skipped_at)
    out.skipped = dict(skipped)
    if not out:
        raise DataError(f"{records[0].origin.file}: no usable examples ({sum(skipped.values())} records skipped: "
                        f"{dict(skipped)})")
    return out


def check_readable(source: Any, at: str, kind: str = "prompt") -> None:
    """Read and convert a local data file now (a pipeline checks its evaluation data before hours of training);
    errors name `at`, the file, the line and the field."""
    if Path(source.path).suffix.lower() not in FILE_SUFFIXES:
        return  # a `datasets` path: loading it may download; it is read when used
    try:
        load_examples(source, kind)
    except DataError as err:
        raise DataError(f"{at}: {err}") from None


def load_examples(source: Any, kind: str) -> Examples:
    """Read a `config.DataSource` and convert every record to `kind`'s canonical examples."""
    records = read_records(source.path, source.split, source.limit, source.columns, source.offset)
    examples = convert_records(records, source.format, kind, getattr(source, "skip_invalid", False))
    if examples.skipped:
        log.warning("%s: skipped %d invalid records: %s", source.path, sum(examples.skipped.values()),
                    "; ".join(f"{n} x {reason}" for reason, n in sorted(examples.skipped.items())))
    return examples


def load_train_validation(data_cfg: Any, kind: str, seed: int) -> tuple[Examples, list]:
    """A stage's training and validation examples: validation from its own source, or a seeded fraction of the
    training records held out (the split is over records, so one record's pairs never straddle it)."""
    examples = load_examples(data_cfg.train, kind)
    if data_cfg.validation is not None:
        return examples, load_examples(data_cfg.validation, kind)
    train, validation = split_validation(examples, data_cfg.validation_fraction, seed)
    return Examples(train, examples.skipped), validation


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the examples held out (at least one)."""
    if fraction <= 0:
        return examples, []
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise DataError(f"validation_fraction={fraction} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def with_system_prompt(examples: list[SFTExample], system_prompt: str) -> list[SFTExample]:
    """Put `system_prompt` before every chat that has no system message of its own."""
    out = []
    for ex in examples:
        if ex.messages is not None and ex.messages[0]["role"] != "system":
            ex = SFTExample(messages=[{"role": "system", "content": system_prompt}] + ex.messages, origin=ex.origin)
        out.append(ex)
    return out


def ranking_pairs(examples: Sequence, mode: str = "all_pairs") -> list[PreferenceExample]:
    """Preference pairs for pairwise methods (DPO): pairs stay as they are; a ranking of K responses gives every
    pair with distinct ranks (`all_pairs`, the better one chosen) or its best against its worst (`best_worst`,
    the first listed among tied ones). Ties give no pair; a ranking whose responses all tie gives none."""
    out = []
    for ex in examples:
        if isinstance(ex, PreferenceExample):
            out.append(ex)
            continue
        k = len(ex.responses)
        if mode == "best_worst":
            best = min(range(k), key=lambda i: ex.ranks[i])
            worst = max(range(k), key=lambda i: ex.ranks[i])
            pairs = [(best, worst)] if ex.ranks[best] < ex.ranks[worst] else []
        else:
            pairs = [(i, j) if ex.ranks[i] < ex.ranks[j] else (j, i)
                     for i in range(k) for j in range(i + 1, k) if ex.ranks[i] != ex.ranks[j]]
        out.extend(PreferenceExample(ex.prompt, ex.responses[a], ex.responses[b], None, ex.origin) for a, b in pairs)
    if examples and not out:  # only rankings whose responses all tie give no pair; say so where the file is known
        files = sorted({ex.origin.file for ex in examples if ex.origin is not None})
        raise DataError(f"{', '.join(files) or 'the data'}: no preference pairs from {len(examples)} ranking(s): "
                        f"every ranking's responses tie (equal ranks give no pair)")
    return out
