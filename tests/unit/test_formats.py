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


# ---- preference and ranking formats -------------------------------------------------------------------------

from collections import Counter  # noqa: E402

from align.formats import PreferenceExample, RankingExample  # noqa: E402

from helpers import shared  # noqa: E402


def prefs(path, **kw):
    return formats.load_examples(DataSource(path=str(path), **kw), "preference")


def test_hh_transcripts_split_into_shared_prompt_and_final_replies():
    examples = prefs(shared("hh_harmless.jsonl"), skip_invalid=True)
    raw = [json.loads(line) for line in open(shared("hh_harmless.jsonl"))]
    first = examples[0]
    assert isinstance(first, PreferenceExample) and first.prompt[-1]["role"] == "user"
    assert [m["role"] for m in first.chosen] == ["assistant"]
    tail = raw[0]["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert first.chosen[0]["content"] == tail
    assert all(e.prompt[-1]["role"] == "user" and e.chosen[-1]["role"] == "assistant" for e in examples)


def test_hh_rows_that_diverge_before_the_last_turn():
    """Rows 662 and 1030 (1-based lines) differ from an earlier assistant turn: the prompt stops at the last
    shared user turn and each response carries every turn after it."""
    by_line = {e.origin.line: e for e in prefs(shared("hh_harmless.jsonl"), skip_invalid=True)}
    for line, prompt_turns, last_user in ((662, 9, "Yes, I have that."), (1030, 3, "Isn't that drag kings?")):
        e = by_line[line]
        assert len(e.prompt) == prompt_turns and e.prompt[-1] == {"role": "user", "content": last_user}
        assert len(e.chosen) == 2 and len(e.rejected) == 1
        raw = json.loads(open(shared("hh_harmless.jsonl")).readlines()[line - 1])
        assert raw["chosen"].rstrip().endswith(e.chosen[-1]["content"])
        assert raw["rejected"].rstrip().endswith(e.rejected[-1]["content"])


def test_hh_empty_reply_is_an_error_or_a_counted_skip():
    with pytest.raises(DataError, match=r"hh_harmless\.jsonl:1481: field 'chosen': empty response"):
        prefs(shared("hh_harmless.jsonl"))
    examples = prefs(shared("hh_harmless.jsonl"), skip_invalid=True)
    assert len(examples) == 1797 and examples.skipped == {"field 'chosen': empty response": 3}


def test_oasst_trees_give_one_ranking_per_ranked_sibling_group():
    groups = prefs(shared("oasst_en100_trees.jsonl"))
    assert all(isinstance(g, RankingExample) for g in groups)
    assert len(groups) == 212
    assert sorted(Counter(len(g.responses) for g in groups).items()) == [
        (2, 57), (3, 117), (4, 27), (5, 3), (6, 6), (8, 1), (9, 1)]
    tree = json.loads(open(shared("oasst_en100_trees.jsonl")).readline())
    first = groups[0]
    assert first.prompt == [{"role": "user", "content": tree["prompt"]["text"]}]
    ranked = [r for r in tree["prompt"]["replies"] if r.get("rank") is not None]
    assert first.ranks == [float(r["rank"]) for r in ranked]
    assert [resp[0]["content"] for resp in first.responses] == [r["text"] for r in ranked]


def test_explicit_preference_with_messages_and_margin(tmp_path):
    rec = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": "5", "margin": 2}
    (e,) = prefs(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert e.chosen == [{"role": "assistant", "content": "4"}] and e.rejected[0]["content"] == "5"
    assert e.margin == 2.0 and e.as_ranking().ranks == [0.0, 1.0]


def test_ranked_lists_with_ranks_or_scores(tmp_path):
    rows = [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
            {"prompt": "q", "responses": ["a", "b"], "scores": [0.2, 0.9]}]
    a, b = prefs(write_jsonl(tmp_path / "r.jsonl", rows))
    assert a.ranks == [1.0, 0.0, 1.0]  # ties kept as equal ranks
    assert b.ranks[1] < b.ranks[0]  # the higher score is the better rank


@pytest.mark.parametrize("rec, pattern", [
    ({"prompt": "q", "responses": ["only one"], "ranks": [0]},
     r"field 'responses': a ranking needs at least 2 responses, got 1"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1]}, r"field 'ranks': expected 3 numbers"),
    ({"prompt": "q", "responses": ["a", ""], "ranks": [0, 1]}, r"field 'responses\[1\]': empty response"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"field 'chosen': empty response"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: a"},
     "chosen and rejected are identical"),
])
def test_bad_preference_and_ranking_records(tmp_path, rec, pattern):
    with pytest.raises(DataError, match=rf"b\.jsonl:1: {pattern}"):
        prefs(write_jsonl(tmp_path / "b.jsonl", [rec]))


def test_offset_and_limit_read_a_slice_with_the_files_line_numbers():
    examples = sft(GSM8K, offset=10, limit=3)
    lines = open(GSM8K).read().splitlines()
    assert [e.messages[0]["content"] for e in examples] == [json.loads(lines[i])["question"] for i in (10, 11, 12)]
    assert [e.origin.line for e in examples] == [11, 12, 13]
    assert len(sft(GSM8K, offset=395)) == 5
    with pytest.raises(DataError, match="no records from offset=400 on"):
        sft(GSM8K, offset=400)


def test_hh_transcripts_as_sft_demonstrations_are_the_chosen_dialogue():
    hh = str(ROOT / "data" / "hh_harmless.jsonl")
    first = json.loads(open(hh).readline())
    example = sft(hh, limit=1)[0]
    assert example.messages == formats.parse_hh(None, "chosen", first["chosen"])
    assert example.messages[-1]["role"] == "assistant" and example.messages[0]["role"] == "user"
    # Rows 1481, 1506 and 1791 have an empty chosen reply: an error naming the line, or a counted skip.
    with pytest.raises(DataError, match=r"hh_harmless.jsonl:1481: field 'chosen'"):
        sft(hh, offset=1470, limit=20)
    kept = sft(hh, offset=1470, limit=20, skip_invalid=True)
    assert len(kept) == 19 and sum(kept.skipped.values()) == 1
