import json

import pytest

from align import formats
from align.config import DataSource
from align.formats import DataError, SFTExample
from helpers import ROOT

GSM8K = str(ROOT / "data" / "gsm8k_400.jsonl")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft(path, **kw):
    return formats.load_examples(DataSource(path=str(path), **kw), "sft")


def test_gsm8k_real_records_become_user_question_and_assistant_answer():
    examples = sft(GSM8K, limit=5)
    first = json.loads(open(GSM8K).readline())
    assert len(examples) == 5
    assert examples[0].messages == [{"role": "user", "content": first["question"]},
                                    {"role": "assistant", "content": first["answer"]}]
    assert examples[0].messages[1]["content"].rstrip().endswith("#### 72")
    assert str(examples[2].origin) == f"{GSM8K}:3"


def test_multi_turn_chat_keeps_every_turn_and_role(tmp_path, chat):
    examples = sft(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]))
    assert examples[0].messages == chat


def test_sharegpt_conversations_are_mapped_to_roles(tmp_path):
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}]}
    (ex,) = sft(write_jsonl(tmp_path / "s.jsonl", [rec]))
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert ex.messages[2]["content"] == "hello"


def test_prompt_completion_as_strings_and_as_messages(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+3?"}],
             "completion": [{"role": "assistant", "content": "5"}]}]
    a, b = sft(write_jsonl(tmp_path / "pc.jsonl", rows))
    assert a.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant"] and b.messages[-1]["content"] == "5"


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    a, b = sft(write_jsonl(tmp_path / "a.jsonl", rows))
    assert a.messages[0] == {"role": "user", "content": "Translate\n\nbonjour"}
    assert b.messages[0] == {"role": "user", "content": "Say hi"} and b.messages[1]["content"] == "hi"


def test_plain_text_for_continued_pretraining(tmp_path):
    (ex,) = sft(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert ex == SFTExample(text="Once upon a time.")


def test_column_mapping_renames_fields(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "why?", "a": "because"}])
    (ex,) = sft(path, format="question_answer", columns={"question": "q", "answer": "a"})
    assert ex.messages[1]["content"] == "because"


def test_json_and_parquet_files_are_read_with_record_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name, unit in (("d.json", "record"), ("d.parquet", "row")):
        examples = sft(tmp_path / name)
        assert [e.messages[1]["content"] for e in examples] == ["a0", "a1", "a2"]
        assert str(examples[1].origin).endswith(f"{name} {unit} 2")


def test_datasets_loadable_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": "i", "output": "o"}])
    (ex,) = sft(folder)
    assert ex.messages[1]["content"] == "o"


# ---- bad input: one line naming file, line and field --------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        sft(path)


def test_missing_column_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'answer'"):
        sft(path)


def test_missing_mapped_column_names_it(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"q": "x"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing field 'a' \(mapped to 'answer'"):
        sft(path, format="question_answer", columns={"question": "q", "answer": "a"})


def test_empty_dataset_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        sft(path)


def test_bad_role_and_empty_answer_and_no_assistant_are_errors(tmp_path):
    cases = [
        ({"messages": [{"role": "bot", "content": "x"}]}, r"field 'messages\[0\]\.role'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
         r"field 'messages\[1\]\.content' is empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
         r"'messages\[0\]\.content': expected a string, got int"),
        ({"question": "q", "answer": ""}, "field 'answer' is empty"),
    ]
    for i, (rec, pattern) in enumerate(cases):
        path = write_jsonl(tmp_path / f"b{i}.jsonl", [rec])
        with pytest.raises(DataError, match=rf"b{i}\.jsonl:1: .*{pattern}"):
            sft(path)


def test_undetectable_format_lists_what_is_expected(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot detect the format from fields \['foo'\]"):
        sft(path)


def test_validation_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val = formats.split_validation(items, 0.1, seed=3)
    assert len(val) == 10 and set(train) | set(val) == set(items) and not set(train) & set(val)
    assert formats.split_validation(items, 0.1, seed=3) == (train, val)
    assert formats.split_validation(items, 0.1, seed=4)[1] != val
