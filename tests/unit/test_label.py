"""align.label without a browser: the file formats, the answers file, the queue and the pages (FastAPI's client)."""

import json
import re

import pytest
from fastapi.testclient import TestClient

from align import formats
from align.config import ConfigError, DataSource
from align.formats import DataError
from align.label.app import Task, build_app
from align.label.store import Journal, Queue, comparison_items, ranking_items, shown_order


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CANDIDATES = [
    {"prompt": "Say hi", "responses": ["Hi!", "Hello there.", "Go away."]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", "5"], "policies": ["p1", "p2"]},
    {"prompt": "Name a colour", "responses": ["red", "blue", "seven"]},
]


def server(tmp_path, kind="rank", rows=CANDIDATES, per_item=1, token=None, out="answers.jsonl", hosts=None):
    source = write_jsonl(tmp_path / ("candidates.jsonl" if kind == "rank" else "samples.jsonl"), rows)
    items = ranking_items(str(source)) if kind == "rank" else comparison_items(str(source))[0]
    journal = Journal(str(tmp_path / out), kind)
    queue = Queue(items, journal.answers, per_item)
    journal.open()
    return TestClient(build_app(Task(kind, items, journal, queue, token, hosts=hosts))), items, journal


def item_on(page: str) -> str:
    return re.search(r'name="item" value="(\w+)"', page).group(1)


def shown_texts(page: str) -> list[str]:
    return re.findall(r'<article class="response"[^>]*>\s*<h2>[^<]*</h2>\s*<div class="text">(.*?)</div>', page, re.S)


def answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------
# Formats: what align.rm reads back


def test_skip_and_flag_lines_are_counted_as_skipped_and_never_trained_on(tmp_path):
    rank = {"label": "rank", "prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "item": "x", "annotator": "n"}
    skip = {**rank, "label": "skip", "item": "y"}
    skip.pop("ranks")
    flag = {**skip, "label": "flag", "reason": "unsafe", "item": "z"}
    path = write_jsonl(tmp_path / "r.jsonl", [skip, rank, flag])  # a skip first: the format is still detected
    examples = formats.load_examples(DataSource(path=str(path)), "preference")
    assert [ex.ranks for ex in examples] == [[1.0, 2.0]]
    assert examples.skipped == {"skipped by the annotator": 1, "flagged by the annotator": 1}


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "responses": ["only one"]}, "responses"),
    ({"prompt": "p", "responses": ["a", ""]}, "responses[1]"),
    ({"prompt": "p", "responses": ["a", "b"], "policies": ["x"]}, "policies"),
    ({"prompt": 3, "responses": ["a", "b"]}, "prompt"),
])
def test_a_bad_candidates_record_names_file_line_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "c.jsonl", [CANDIDATES[0], row])
    with pytest.raises(DataError, match=rf"c\.jsonl:2: field '{re.escape(field)}'"):
        ranking_items(str(path))


def test_comparison_rows_where_both_policies_wrote_the_same_text_are_left_out(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "candidate": "a", "baseline": "b", "reward_candidate": 1.0,
             "reward_baseline": 0.5},
            {"prompt": [{"role": "user", "content": "q2"}], "candidate": "same", "baseline": "same",
             "reward_candidate": 0.0, "reward_baseline": 0.0}]
    items, identical = comparison_items(str(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert identical == 1 and len(items) == 1
    assert items[0].responses == ["a", "b"] and items[0].rewards == [1.0, 0.5]


# --------------------------------------------------------------------------------------------------------------
# The answers file


def test_a_file_that_is_not_ours_is_refused_and_left_byte_for_byte(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"my": "data"}\n')
    with pytest.raises(ConfigError, match=r"notes\.jsonl:1: not an align\.label ranking answer"):
        Journal(str(path), "rank")
    assert path.read_text() == '{"my": "data"}\n'


def test_a_cut_last_line_is_refused_rather_than_appended_to(tmp_path):
    path = tmp_path / "a.jsonl"
    good = json.dumps({"label": "skip", "item": "x", "annotator": "n"}) + "\n"
    path.write_text(good + '{"label": "ra')
    with pytest.raises(ConfigError, match=r"a\.jsonl:2: the last line is cut short"):
        Journal(str(path), "rank")


def test_a_second_server_on_the_same_file_is_refused(tmp_path):
    first = Journal(str(tmp_path / "a.jsonl"), "rank")
    first.open()
    second = Journal(str(tmp_path / "a.jsonl"), "rank")
    with pytest.raises(ConfigError, match="another align.label server is writing it"):
        second.open()
    first.close()


# --------------------------------------------------------------------------------------------------------------
# The queue


def test_an_item_shown_to_one_annotator_is_not_shown_to_another_until_its_hold_expires(tmp_path):
    items = ranking_items(str(write_jsonl(tmp_path / "c.jsonl", CANDIDATES)))
    queue = Queue(items, [], per_item=1, hold_seconds=60)
    assert queue.next("ann").id == items[0].id
    assert queue.next("ann").id == items[0].id  # a reload shows the same item
    assert queue.next("bob").id == items[1].id
    expired = Queue(items, [], per_item=1, hold_seconds=-1)
    expired.next("ann")
    assert expired.next("bob").id == items[0].id


def test_with_two_annotators_per_item_both_get_every_item_and_a_third_gets_none(tmp_path):
    items = ranking_items(str(write_jsonl(tmp_path / "c.jsonl", CANDIDATES)))
    queue = Queue(items, [], per_item=2)
    for who in ("ann", "bob"):
        for it in items:
            assert queue.next(who).id == it.id
            queue.record({"label": "rank", "item": it.id, "annotator": who})
    assert queue.next("cid") is None
    assert queue.progress("ann") == {"mine": 3, "complete": 3, "total": 3}


def test_a_skip_does_not_count_toward_the_answers_an_item_needs(tmp_path):
    items = ranking_items(str(write_jsonl(tmp_path / "c.jsonl", CANDIDATES)))
    queue = Queue(items, [{"label": "skip", "item": items[0].id, "annotator": "ann"}], per_item=1)
    assert queue.next("ann").id == items[1].id  # ann skipped the first item: not shown to ann again
    assert queue.next("bob").id == items[0].id  # but it still needs an answer


def test_the_shown_order_is_fixed_per_annotator_and_differs_between_annotators(tmp_path):
    rows = [{"prompt": "p", "responses": [f"r{i}" for i in range(8)]}]
    item = ranking_items(str(write_jsonl(tmp_path / "c.jsonl", rows)))[0]
    assert shown_order(item, "ann") == shown_order(item, "ann")
    assert sorted(shown_order(item, "ann")) == list(range(8))
    assert shown_order(item, "ann") != shown_order(item, "bob")


# --------------------------------------------------------------------------------------------------------------
# The pages


def test_ranks_given_to_shown_letters_are_stored_against_the_right_responses(tmp_path):
    client, items, _ = server(tmp_path)
    page = client.get("/?annotator=ann").text
    texts = shown_texts(page)
    want = {"Hi!": 1, "Hello there.": 1, "Go away.": 2}  # a tie between the two greetings
    form = {"item": item_on(page), "annotator": "ann", "shown_at": "0", "action": "rank"}
    form.update({f"rank_{'ABC'[pos]}": str(want[t]) for pos, t in enumerate(texts)})
    r = client.post("/answer", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?annotator=ann"
    [line] = answers(tmp_path / "answers.jsonl")
    assert line["responses"] == CANDIDATES[0]["responses"] and line["ranks"] == [1, 1, 2]
    assert [CANDIDATES[0]["responses"][j] for j in line["shown"]] == texts
    assert item_on(client.get("/?annotator=ann").text) == items[1].id


def test_ranks_with_gaps_are_stored_as_dense_ranks(tmp_path):
    client, _, _ = server(tmp_path)
    page = client.get("/?annotator=ann").text
    client.post("/answer", data={"item": item_on(page), "annotator": "ann", "action": "rank",
                                 "rank_A": "3", "rank_B": "3", "rank_C": "1"})
    ranks = answers(tmp_path / "answers.jsonl")[0]["ranks"]
    assert sorted(ranks) == [1, 2, 2]


def test_an_incomplete_ranking_or_a_flag_without_reason_writes_nothing(tmp_path):
    client, _, _ = server(tmp_path)
    item = item_on(client.get("/?annotator=ann").text)
    r = client.post("/answer", data={"item": item, "annotator": "ann", "action": "rank", "rank_A": "1"})
    assert r.status_code == 400 and "Give response B a rank" in r.text
    r = client.post("/answer", data={"item": item, "annotator": "ann", "action": "flag", "reason": "  "})
    assert r.status_code == 400 and "Say what is unsafe" in r.text
    assert (tmp_path / "answers.jsonl").read_text() == ""


def test_submitting_the_same_page_twice_records_one_answer(tmp_path):
    client, _, _ = server(tmp_path)
    item = item_on(client.get("/?annotator=ann").text)
    for _ in range(2):
        client.post("/answer", data={"item": item, "annotator": "ann", "action": "flag", "reason": "broken"})
    [line] = answers(tmp_path / "answers.jsonl")
    assert line["label"] == "flag" and line["reason"] == "broken"


def test_a_token_is_required_when_set_and_kept_in_a_cookie(tmp_path):
    client, _, _ = server(tmp_path, token="s3cret-token")
    assert client.get("/?annotator=ann").status_code == 403
    assert client.post("/answer", data={"annotator": "ann"}).status_code == 403
    assert client.get("/?annotator=ann&token=wrong-token").status_code == 403
    assert client.get("/?annotator=ann&token=s3cret-token").status_code == 200
    assert client.get("/?annotator=ann").status_code == 200  # the cookie now carries it


def test_markup_in_model_output_is_escaped_and_scripts_are_limited_to_our_own(tmp_path):
    rows = [{"prompt": "<b>bold?</b>", "responses": ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">']}]
    client, _, _ = server(tmp_path, rows=rows)
    r = client.get("/?annotator=ann")
    assert "<script>alert" not in r.text and "<img src=x" not in r.text and "<b>bold" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text and "&lt;b&gt;bold?&lt;/b&gt;" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]


def test_a_comparison_verdict_maps_the_shown_letter_back_to_candidate_or_baseline(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "candidate": f"cand {i}", "baseline": f"base {i}",
             "reward_candidate": 1.0, "reward_baseline": 0.0} for i in range(6)]
    client, _, _ = server(tmp_path, kind="compare", rows=rows)
    for _ in range(6):
        page = client.get("/?annotator=ann").text
        texts = shown_texts(page)
        letter = "AB"[[t.startswith("cand") for t in texts].index(True)]  # always pick the candidate's
        client.post("/answer", data={"item": item_on(page), "annotator": "ann", "shown_at": "0", "choice": letter})
    lines = answers(tmp_path / "answers.jsonl")
    assert [a["verdict"] for a in lines] == ["candidate"] * 6
    assert {tuple(a["shown"]) for a in lines} == {("candidate", "baseline"), ("baseline", "candidate")}
    assert "All done" in client.get("/?annotator=ann").text


def test_a_page_addressed_by_another_host_name_or_a_cross_site_post_is_refused(tmp_path):
    from align.label.app import LOOPBACK_HOSTS

    client, items, _ = server(tmp_path, hosts=LOOPBACK_HOSTS)
    client.base_url = "http://127.0.0.1:8000"
    assert client.get("/?annotator=ann").status_code == 200
    client.base_url = "http://evil.example:8000"  # DNS rebinding: another site's name resolved to 127.0.0.1
    assert client.get("/?annotator=ann").status_code == 400
    client.base_url = "http://127.0.0.1:8000"
    form = {"item": items[0].id, "annotator": "ann", "action": "skip"}
    r = client.post("/answer", data=form, headers={"origin": "http://evil.example"}, follow_redirects=False)
    assert r.status_code == 403 and (tmp_path / "answers.jsonl").read_text() == ""
    r = client.post("/answer", data=form, headers={"origin": "http://127.0.0.1:8000"}, follow_redirects=False)
    assert r.status_code == 303 and len(answers(tmp_path / "answers.jsonl")) == 1


def test_a_short_write_is_cut_back_to_the_last_whole_line_and_the_page_says_not_saved(tmp_path, monkeypatch):
    import align.label.store as store

    client, items, journal = server(tmp_path)
    client.post("/answer", data={"item": items[0].id, "annotator": "ann", "action": "skip"})
    whole = (tmp_path / "answers.jsonl").read_bytes()
    real_write = store.os.write
    monkeypatch.setattr(store.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # a full disk
    r = client.post("/answer", data={"item": items[1].id, "annotator": "ann", "action": "skip"})
    assert r.status_code == 503 and "Not saved" in r.text
    assert (tmp_path / "answers.jsonl").read_bytes() == whole and len(journal.answers) == 1
    monkeypatch.setattr(store.os, "write", real_write)
    client.post("/answer", data={"item": items[1].id, "annotator": "ann", "action": "skip"})
    assert [a["item"] for a in answers(tmp_path / "answers.jsonl")] == [items[0].id, items[1].id]


def test_an_answer_arriving_after_the_item_got_its_answers_is_kept_not_thrown_away(tmp_path):
    client, items, _ = server(tmp_path, per_item=1)
    for who in ("ann", "bob"):  # bob's page was left open past ann's answer
        client.post("/answer", data={"item": items[0].id, "annotator": who, "action": "flag", "reason": "odd"})
    assert [a["annotator"] for a in answers(tmp_path / "answers.jsonl")] == ["ann", "bob"]


def test_more_responses_than_rank_keys_are_refused_naming_the_line(tmp_path):
    ten = {"prompt": "p", "responses": [f"r{i}" for i in range(10)]}
    path = write_jsonl(tmp_path / "c.jsonl", [CANDIDATES[0], ten])
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'responses': at most 9 responses"):
        ranking_items(str(path))


# --------------------------------------------------------------------------------------------------------------
# The command line


def run_cli(argv, capsys):
    from align.label.__main__ import main

    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_summary_merges_two_annotators_rankings_by_mean_rank_into_a_new_file_align_rm_reads(tmp_path, capsys):
    base = {"prompt": "p", "responses": ["a", "b", "c"], "policies": None}
    rows = [{**base, "label": "rank", "item": "i1", "annotator": "ann", "ranks": [1, 2, 3]},
            {**base, "label": "rank", "item": "i1", "annotator": "bob", "ranks": [2, 1, 3]},  # means 1.5, 1.5, 3
            {**base, "label": "flag", "item": "i2", "annotator": "bob", "reason": "broken"},
            {**base, "label": "rank", "item": "i2", "annotator": "ann", "ranks": [3, 2, 1]}]
    answers = write_jsonl(tmp_path / "r.jsonl", rows)
    merged = tmp_path / "merged.jsonl"
    out = run_cli(["summary", str(answers), "--merged", str(merged)], capsys)
    assert out["merged"] == {"path": str(merged), "items": 1}  # i2 was flagged: left out
    [record] = [json.loads(x) for x in merged.read_text().splitlines()]
    assert record["ranks"] == [1, 1, 2] and record["annotators"] == ["ann", "bob"]
    assert [ex.ranks for ex in formats.load_examples(DataSource(path=str(merged)), "preference")] == [[1, 1, 2]]
    before = merged.read_bytes()
    with pytest.raises(SystemExit) as stop:
        run_cli(["summary", str(answers), "--merged", str(merged)], capsys)
    assert stop.value.code == 2 and merged.read_bytes() == before


def test_a_non_loopback_host_gets_a_drawn_token_and_loopback_none(tmp_path):
    from argparse import Namespace

    from align.label.__main__ import check_server_args

    common = dict(per_item=1, token=None)
    assert check_server_args(Namespace(host="127.0.0.1", **common)) is None
    drawn = check_server_args(Namespace(host="0.0.0.0", **common))
    assert drawn and len(drawn) >= 16 and drawn != check_server_args(Namespace(host="0.0.0.0", **common))
    assert check_server_args(Namespace(host="0.0.0.0", per_item=1, token="my-long-token")) == "my-long-token"
    with pytest.raises(ConfigError, match="at least 8 characters"):
        check_server_args(Namespace(host="0.0.0.0", per_item=1, token="short"))


def test_bad_candidates_stop_the_server_before_it_starts_and_nothing_is_written(tmp_path, capsys):
    cands = write_jsonl(tmp_path / "c.jsonl", [CANDIDATES[0], {"prompt": "p", "responses": ["x"]}])
    with pytest.raises(SystemExit) as stop:
        run_cli(["rank", "--candidates", str(cands), "--out", str(tmp_path / "r.jsonl"), "--port", "0"], capsys)
    assert stop.value.code == 2
    assert "c.jsonl:2: field 'responses'" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_summary_of_verdicts_with_only_skips_and_flags_says_so(tmp_path, capsys):
    base = {"prompt": [{"role": "user", "content": "q"}], "candidate": "a", "baseline": "b", "reward_candidate": 1.0,
            "reward_baseline": 0.0, "item": "i1"}
    path = write_jsonl(tmp_path / "v.jsonl", [{**base, "label": "skip", "annotator": "ann"},
                                              {**base, "label": "flag", "annotator": "bob", "reason": "x"}])
    out = run_cli(["summary", str(path)], capsys)
    assert out["human_win_rate"] is None and out["n_items"] == 0 and out["flagged_items"] == ["i1"]
