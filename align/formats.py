"""Real-world record formats -> canonical examples.

A record (one JSON object, parquet row or `datasets` row) becomes one canonical example:

    SFTExample(messages)          chat, prompt/completion, alpaca, question/answer
    SFTExample(text=...)          plain text (continued pre-training)

Every example remembers its `Origin` (file and line), so any later error (bad field, too long with truncation
off...) names where the record came from. Bad input raises `DataError` with one line: `FILE:LINE: field ...`.

Formats are detected from the first record's fields, or named in the recipe (`data.train.format`), with a
column mapping (`data.train.columns`, canonical name -> the file's name) for files that name things differently.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style `conversations: [{from, value}]` speakers.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


class DataError(ValueError):
    """Unusable input; the message is one line naming the file, the line and the field."""


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


@dataclass
class SFTExample:
    messages: Optional[list[Message]] = None
    """A chat: system/user/assistant turns, loss on the assistant turns."""
    text: Optional[str] = None
    """Plain text (continued pre-training), loss on every token."""
    origin: Optional[Origin] = field(default=None, compare=False)


# --------------------------------------------------------------------------------------------------------------
# Reading files


def read_records(path: str, split: str = "train", limit: Optional[int] = None,
                 columns: Optional[dict[str, str]] = None) -> list[Record]:
    """All records of a file or `datasets` path, each with its origin. Raises DataError on an unreadable
    record, naming the line; on a missing file or an empty dataset, naming the file."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet") and not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".jsonl":
        records = list(_read_jsonl(path, limit))
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        records = [Record(r, Origin(path, i + 1, "row")) for i, r in enumerate(rows)]
    else:
        records = _read_datasets(path, split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    if columns:
        records = [Record(_rename(r, columns), r.origin) for r in records]
    return records


def _read_jsonl(path: str, limit: Optional[int]) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
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
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
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


def _field(record: Record, name: str, fmt: str) -> Any:
    if name not in record.data or record.data[name] is None:
        raise DataError(
            f"{record.origin}: missing field '{name}' (format {fmt}; rename columns with data.*.columns)"
        )
    return record.data[name]


def _string(record: Record, name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{record.origin}: field '{name}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{record.origin}: field '{name}' is empty")
    return value


def _messages(record: Record, name: str, value: Any, sharegpt: bool = False) -> list[Message]:
    """A list of {role, content} (or ShareGPT {from, value}) turns, validated."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{record.origin}: field '{name}': expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{record.origin}: field '{at}': expected an object with role and content")
        if sharegpt or ("from" in msg and "role" not in msg):
            speaker = msg.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise DataError(f"{record.origin}: field '{at}.from': unknown speaker {speaker!r}")
            role, content = SHAREGPT_ROLES[speaker], msg.get("value")
            content_at = f"{at}.value"
        else:
            role, content = msg.get("role"), msg.get("content")
            content_at = f"{at}.content"
            if role not in ROLES:
                raise DataError(f"{record.origin}: field '{at}.role': expected one of {'/'.join(ROLES)}, got {role!r}")
        if content is None:
            raise DataError(f"{record.origin}: missing field '{content_at}'")
        content = _string(record, content_at, content, allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def _prompt(record: Record, name: str, value: Any) -> list[Message]:
    """A prompt given as a string (one user turn) or as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _string(record, name, value)}]
    return _messages(record, name, value)


def _response(record: Record, name: str, value: Any) -> list[Message]:
    """A response given as a string (one assistant turn) or as messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(record, name, value)}]
    msgs = _messages(record, name, value)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{record.origin}: field '{name}': the last message must be the assistant's")
    return msgs


# --------------------------------------------------------------------------------------------------------------
# SFT formats


def _sft_messages(r: Record) -> SFTExample:
    sharegpt = "conversations" in r.data and "messages" not in r.data
    name = "conversations" if sharegpt else "messages"
    msgs = _messages(r, name, _field(r, name, "messages"), sharegpt=sharegpt)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{r.origin}: field '{name}': no assistant message to learn from")
    return SFTExample(messages=msgs, origin=r.origin)


def _sft_prompt_completion(r: Record) -> SFTExample:
    prompt = _prompt(r, "prompt", _field(r, "prompt", "prompt_completion"))
    completion = _response(r, "completion", _field(r, "completion", "prompt_completion"))
    return SFTExample(messages=prompt + completion, origin=r.origin)


def _sft_alpaca(r: Record) -> SFTExample:
    instruction = _string(r, "instruction", _field(r, "instruction", "alpaca"))
    extra = r.data.get("input") or ""
    user = f"{instruction}\n\n{_string(r, 'input', extra)}" if extra.strip() else instruction
    output = _string(r, "output", _field(r, "output", "alpaca"))
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if r.data.get("system"):
        msgs.insert(0, {"role": "system", "content": _string(r, "system", r.data["system"])})
    return SFTExample(messages=msgs, origin=r.origin)


def _sft_question_answer(r: Record) -> SFTExample:
    question = _string(r, "question", _field(r, "question", "question_answer"))
    answer = _string(r, "answer", _field(r, "answer", "question_answer"))
    return SFTExample(
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}], origin=r.origin
    )


def _sft_text(r: Record) -> SFTExample:
    return SFTExample(text=_string(r, "text", _field(r, "text", "text")), origin=r.origin)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str
    """What it becomes: sft (more kinds come with the reward-model and DPO stages)."""
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
]
BY_NAME = {f.name: f for f in FORMATS}


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
    if name not in BY_NAME or BY_NAME[name].kind != kind:
        options = ", ".join(f.name for f in FORMATS if f.kind == kind)
        raise DataError(f"{record.origin.file}: unknown {kind} format {name!r}; expected auto or one of {options}")
    return BY_NAME[name]


def convert_records(records: list[Record], fmt_name: str, kind: str) -> list[Any]:
    fmt = get_format(fmt_name, records[0], kind)
    return [fmt.convert(r) for r in records]


def load_examples(source: Any, kind: str) -> list[Any]:
    """Read a `config.DataSource` and convert every record to `kind`'s canonical example."""
    records = read_records(source.path, source.split, source.limit, source.columns)
    return convert_records(records, source.format, kind)


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
