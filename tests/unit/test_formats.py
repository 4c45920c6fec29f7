import json
import re

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


# ---- text encoding: one line naming the file, the line and the column of a byte that is not UTF-8 --------------


@pytest.mark.parametrize("name, content, where", [
    ("x.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "x.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)"),
    ("x.json", b'[{"text": "fine"},\n {"text": "ok \xff"}]', "x.json:2: not UTF-8 text (byte 0xff at column 15)"),
    ("x.csv", b'text\nfine\n"two\nlines \xfe"\n', "x.csv:4: not UTF-8 text (byte 0xfe at column 7)"),
])
def test_a_byte_that_is_not_utf8_is_named_by_line_and_column(tmp_path, name, content, where):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / where}") + "$"):
        sft(tmp_path / name)


def test_a_parquet_string_that_is_not_utf8_names_the_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine", b"caf\xe9"], pa.binary())  # arrow validates strings it builds, so bypass that
    text = pa.Array.from_buffers(pa.string(), 2, raw.buffers())
    pq.write_table(pa.table({"id": [1, 2], "text": text}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet row 2: field 'text': not UTF-8 text \(byte 0xe9\)$"):
        sft(tmp_path / "t.parquet")


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", '{"text": "first"}\n{"text": "second"}\n'),
    ("bom.json", '[{"text": "first"}, {"text": "second"}]'),
    ("bom.csv", "text\nfirst\nsecond\n"),
])
def test_a_byte_order_mark_at_the_start_is_accepted(tmp_path, name, content):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert [e.text for e in sft(tmp_path / name)] == ["first", "second"]


# ---- fields of the wrong type or not a finite number ----------------------------------------------------------


@pytest.mark.parametrize("value", [3, ["bonjour"], {"text": "bonjour"}])
def test_alpaca_input_that_is_not_text_is_an_error_naming_it(tmp_path, value):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": value, "output": "hello"}])
    with pytest.raises(DataError, match=rf"^.*a\.jsonl:1: field 'input': expected a string, got "
                                        rf"{type(value).__name__}$"):
        sft(path)


@pytest.mark.parametrize("rec, message", [
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, float("nan")]},
     "field 'ranks[1]': not a finite number (nan)"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, float("inf"), 0]},
     "field 'scores[1]': not a finite number (inf)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("inf")},
     "field 'margin': not a finite number (inf)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -float("inf")},
     "field 'margin': not a finite number (-inf)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10 ** 400},
     "field 'margin': not a finite number (too large)"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, "1"]}, "field 'ranks[1]': expected a number, got str"),
])
def test_ranks_scores_and_margins_must_be_finite_numbers(tmp_path, rec, message):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(rec) + "\n")  # json writes NaN and Infinity, and Python's json reads them back
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:1: {message}") + "$"):
        prefs(path)


def test_nan_ranks_in_parquet_are_an_error_naming_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q", "responses": ["a", "b"], "ranks": [0.0, 1.0]},
            {"prompt": "q", "responses": ["a", "b"], "ranks": [float("nan"), 1.0]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"r\.parquet row 2: field 'ranks\[0\]': not a finite number \(nan\)$"):
        prefs(tmp_path / "r.parquet")


def test_an_openassistant_rank_that_is_nan_is_an_error_naming_the_reply(tmp_path):
    tree = json.loads(open(shared("oasst_en100_trees.jsonl")).readline())
    reply = next(r for r in tree["prompt"]["replies"] if r.get("rank") is not None)
    reply["rank"] = float("nan")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(tree) + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:1: field 'reply {reply['message_id']}.rank': "
                                                        "not a finite number (nan)") + "$"):
        prefs(path)


def test_prompt_response_rows_check_their_types(tmp_path):
    def record(**data):
        return formats.Record(data, formats.Origin("s.jsonl", 4))

    prompt, response = formats.prompt_response(record(prompt="hi", response=""))
    assert prompt == [{"role": "user", "content": "hi"}] and response == [{"role": "assistant", "content": ""}]
    for data, message in (({"prompt": "hi", "response": 7}, "field 'response': expected text or a list of messages, "
                                                             "got int"),
                          ({"prompt": 1.5, "response": "ok"}, "field 'prompt': expected text or a list of messages, "
                                                              "got float"),
                          ({"prompt": "hi"}, "missing field 'response'")):
        with pytest.raises(DataError, match="^" + re.escape(f"s.jsonl:4: {message}")):
            formats.prompt_response(record(**data))


# ---- files that are not what their name says ------------------------------------------------------------------


def test_a_parquet_name_on_a_text_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text('{"text": "this is JSONL"}\n')
    with pytest.raises(DataError, match=r"^.*d\.parquet: not a parquet file \(.*\)$") as err:
        sft(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.parquet", "x.csv"])
def test_a_folder_with_a_file_suffix_is_said_to_be_a_folder(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / name}: a folder, not a file") + "$"):
        sft(tmp_path / name)


# ---- rankings that give no pair -------------------------------------------------------------------------------


def test_rankings_that_all_tie_give_no_pairs_and_the_error_names_the_file(tmp_path):
    rows = [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]},
            {"prompt": "r", "responses": ["a", "b"], "scores": [0.5, 0.5]}]
    examples = prefs(write_jsonl(tmp_path / "ties.jsonl", rows))
    for mode in ("all_pairs", "best_worst"):
        with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'ties.jsonl'}: no preference pairs from 2 "
                                                            "ranking(s): every ranking's responses tie")):
            formats.ranking_pairs(examples, mode)
    # One ranking with distinct ranks is enough; the tied ones just give nothing.
    rows.append({"prompt": "s", "responses": ["a", "b"], "ranks": [1, 0]})
    (pair,) = formats.ranking_pairs(prefs(write_jsonl(tmp_path / "some.jsonl", rows)))
    assert pair.chosen[0]["content"] == "b" and pair.origin.line == 3


# ---- CSV and TSV ----------------------------------------------------------------------------------------------

import csv  # noqa: E402
import io  # noqa: E402


def write_csv(path, header, rows, delimiter=","):
    """Write rows with csv.writer; return the line each row starts on (cells may hold line breaks)."""
    buffer, starts = io.StringIO(), []
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        starts.append(buffer.getvalue().count("\n") + 1)
        writer.writerow(row)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return starts


def test_csv_of_real_hh_pairs_reads_as_the_jsonl_does(tmp_path):
    singles = [e for e in prefs(shared("hh_harmless.jsonl"), limit=120)
               if len(e.prompt) == 1 and len(e.chosen) == 1 and len(e.rejected) == 1]
    spanning = [e for e in singles
                if "\n" in e.prompt[0]["content"] + e.chosen[0]["content"] + e.rejected[0]["content"]]
    single = singles[:3] + spanning[:2]  # single-turn pairs, two of them with line breaks in a cell
    rows = [[e.prompt[0]["content"], e.chosen[0]["content"], e.rejected[0]["content"]] for e in single]
    starts = write_csv(tmp_path / "hh.csv", ["prompt", "chosen", "rejected"], rows)
    examples = prefs(tmp_path / "hh.csv")
    assert [(e.prompt, e.chosen, e.rejected, e.margin) for e in examples] == [
        (e.prompt, e.chosen, e.rejected, None) for e in single]
    assert [str(e.origin) for e in examples] == [f"{tmp_path / 'hh.csv'}:{n}" for n in starts]
    assert starts != list(range(2, 7))  # some replies span lines, so rows do not start on consecutive lines

    # Whole transcripts (the hh format) in cells, which start with a line break, read the same way too.
    raw = [json.loads(line) for line in open(shared("hh_harmless.jsonl")).readlines()[:5]]
    write_csv(tmp_path / "hh_transcripts.csv", ["chosen", "rejected"], [[r["chosen"], r["rejected"]] for r in raw])
    assert prefs(tmp_path / "hh_transcripts.csv") == prefs(shared("hh_harmless.jsonl"), limit=5)


def test_sft_csv_of_real_gsm8k_rows_and_alpaca_with_empty_cells(tmp_path):
    rows = [json.loads(line) for line in open(GSM8K).readlines()[:4]]
    starts = write_csv(tmp_path / "g.csv", ["question", "answer"], [[r["question"], r["answer"]] for r in rows])
    examples = sft(tmp_path / "g.csv")
    assert [e.messages for e in examples] == [e.messages for e in sft(GSM8K, limit=4)]
    assert [e.origin.line for e in examples] == starts and starts[1] > 3  # answers span several lines
    assert [e.messages[0]["content"] for e in sft(tmp_path / "g.csv", offset=1, limit=2)] == [
        rows[1]["question"], rows[2]["question"]]

    # An empty cell is a missing field: no input, no system prompt. Blank rows are skipped; lines still count.
    (tmp_path / "a.tsv").write_text("instruction\tinput\toutput\tsystem\n"
                                    "Translate\tbonjour\thello\t\n\n"
                                    "Say hi\t\thi\tBe brief.\n", encoding="utf-8")
    a, b = sft(tmp_path / "a.tsv")
    assert a.messages == [{"role": "user", "content": "Translate\n\nbonjour"},
                          {"role": "assistant", "content": "hello"}]
    assert b.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                          {"role": "assistant", "content": "hi"}]
    assert (a.origin.line, b.origin.line) == (2, 4)


def test_csv_cells_hold_numbers_as_text_and_lists_as_json(tmp_path):
    rows = [["Which is right?", '["Paris", "Lyon", "Nice"]', "[0, 1, 1]", ""],
            ["2+2?", '["4", "5"]', "", ""]]
    write_csv(tmp_path / "r.csv", ["prompt", "responses", "ranks", "scores"], rows)
    with pytest.raises(DataError, match=r"r\.csv:3: missing field 'ranks' \(or 'scores'\)"):
        prefs(tmp_path / "r.csv")
    rows[1][3] = "[0.9, 0.1]"
    write_csv(tmp_path / "r.csv", ["prompt", "responses", "ranks", "scores"], rows)
    a, b = prefs(tmp_path / "r.csv")
    assert [r[0]["content"] for r in a.responses] == ["Paris", "Lyon", "Nice"] and a.ranks == [0.0, 1.0, 1.0]
    assert b.ranks == [-0.9, -0.1]

    write_csv(tmp_path / "m.csv", ["prompt", "chosen", "rejected", "margin"],
              [["[not JSON, a prompt]", "yes", "no", "1.5"], ["q", "a", "b", ""], ["q", "a", "b", "lots"]])
    with pytest.raises(DataError, match=r"m\.csv:4: field 'margin': expected a number, got 'lots'$"):
        prefs(tmp_path / "m.csv")
    first, second = prefs(tmp_path / "m.csv", limit=2)
    assert first.prompt == [{"role": "user", "content": "[not JSON, a prompt]"}] and first.margin == 1.5
    assert second.margin is None

    # A JSON file is not read that way: a margin given as a string there is an error, as before.
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1.5"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'margin': expected a number, got str"):
        prefs(path)


@pytest.mark.parametrize("text, message", [
    ("prompt,chosen,rejected\nq,a\n", "x.csv:2: 2 cells, but the header has 3 columns"),
    ("prompt,chosen,prompt\nq,a,b\n", "x.csv:1: column 'prompt' appears twice in the header"),
    ('prompt,responses,ranks\nq,"[""a"", ""b""","[0, 1]"\n', "x.csv:2: field 'responses': expected a JSON list in the "
                                                          "cell"),
    ("prompt,responses,ranks\nq,\"[\"\"a\"\", \"\"b\"\"]\",\"[0, NaN]\"\n", "x.csv:2: field 'ranks[1]': not a finite "
                                                                          "number (nan)"),
])
def test_bad_csv_rows_name_the_line(tmp_path, text, message):
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/{message}")):
        prefs(tmp_path / "x.csv")


def test_check_readable_reads_a_csv_now(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nhi\n\n42\n", encoding="utf-8")
    formats.check_readable(DataSource(path=str(tmp_path / "p.csv")), "evaluate.prompts")
    (tmp_path / "bad.csv").write_text("question\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^evaluate\.prompts: .*bad\.csv: no records"):
        formats.check_readable(DataSource(path=str(tmp_path / "bad.csv")), "evaluate.prompts")
