"""reward_models.rules: final-answer extraction on real GSM8K answers, the exact-match reward, the shaping rules."""

from __future__ import annotations

import json
import re

import pytest
import torch

from reward_models import rules

from helpers import ROOT

GSM8K_400 = ROOT / "data" / "gsm8k_400.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with open(GSM8K_400, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def exact(rows) -> rules.GSM8KExactMatch:
    return rules.GSM8KExactMatch.from_file(GSM8K_400)


def test_final_answer_on_every_real_reference(rows):
    assert len(rows) == 400
    with_separators = 0
    for row in rows:
        after = row["answer"].rsplit("####", 1)[1].strip()
        with_separators += "," in after
        assert rules.final_answer(row["answer"]) == after.replace(",", ""), row["answer"]
    # The slice really exercises thousands separators ("#### 1,080", "#### 850,000"), not just plain integers.
    assert with_separators == 2


def test_final_answer_rules():
    # "####" wins over later numbers; without it the last number counts.
    assert rules.final_answer("3 + 4 = 7\n#### 7\nCheck: 8 apples") == "7"
    assert rules.final_answer("a #### 1 then #### 2") == "2"
    assert rules.final_answer("We get 5, then 12, so the answer is 72.") == "72"
    assert rules.final_answer("The range 10-5 is 5 wide, net change -5") == "-5"
    assert rules.final_answer("ends at 10-5") == "5"
    assert rules.final_answer("the list 3,4") == "4"  # not thousands grouping
    assert rules.final_answer("bad grouping 1,2345") == "2345"  # not "1,234" then "5"
    assert rules.final_answer("she paid $0.50 each") == "0.5"
    assert rules.final_answer("no numbers here") is None
    assert rules.final_answer("#### nothing") is None


@pytest.mark.parametrize("text", ["1,234", "1234", "1234.0", "$1234", "$1,234.00", "#### 1,234", "so 1234."])
def test_number_forms_are_equal(text):
    assert rules.final_answer(text) == "1234"


def test_number_forms_differ_when_values_differ():
    assert rules.final_answer("72") == rules.final_answer("72.00")
    assert rules.final_answer("72") != rules.final_answer("72.5")
    assert rules.final_answer("-72") != rules.final_answer("72")
    assert rules.final_answer("-0") == rules.final_answer("0.0") == "0"


def test_exact_match_on_real_rows(rows, exact):
    questions = [r["question"] for r in rows[:20]]
    answers = [r["answer"] for r in rows[:20]]
    scores = exact.score(questions, answers)
    assert scores.dtype == torch.float32 and scores.shape == (20,)
    assert scores.tolist() == [1.0] * 20

    # Same worked solutions with the final number changed: every one must now score 0.
    wrong = [re.sub(r"####.*$", f"#### {int(rules.final_answer(a)) + 1}", a) for a in answers]
    assert exact.score(questions, wrong).tolist() == [0.0] * 20

    assert rows[0]["answer"].endswith("#### 72")
    first = [rows[0]["question"]]
    assert exact.score(first, ["48/2 = 24 in May, 48 + 24 in total, so the answer is 72"]).tolist() == [1.0]
    assert exact.score(first, ["so the answer is 72, not 24"]).tolist() == [0.0]  # last number, not any number


def test_exact_match_with_separators_in_reference(rows, exact):
    row = next(r for r in rows if r["answer"].endswith("#### 1,080"))
    assert exact.score([row["question"]] * 3, ["It is 1080.", "$1,080", "1,081"]).tolist() == [1.0, 1.0, 0.0]


def test_exact_match_with_bare_number_references():
    rule = rules.GSM8KExactMatch({"  What is 6 x 7?\n": "42", "Half of 5?": "2.5"})
    assert rule.score(["What is 6 x 7?", "Half of 5?", "Half of 5?"], ["42", "2.50", "2"]).tolist() == [1.0, 1.0, 0.0]


def test_prompts_as_strings_or_messages_score_the_same(rows, exact):
    questions = [r["question"] for r in rows[:6]]
    responses = [r["answer"] if i % 2 == 0 else "I think 3" for i, r in enumerate(rows[:6])]
    chats = [
        [
            {"role": "system", "content": "Solve the math problem."},
            {"role": "user", "content": "An earlier question, 5 + 5?"},
            {"role": "assistant", "content": "10"},
            {"role": "user", "content": q},
        ]
        for q in questions
    ]
    as_messages = [[{"role": "assistant", "content": "Let me think."}, {"role": "assistant", "content": r}]
                   for r in responses]
    expected = exact.score(questions, responses)
    assert expected.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert torch.equal(exact.score(chats, responses), expected)
    assert torch.equal(exact.score(chats, as_messages), expected)


def test_text_helpers():
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "last"}, {"role": "assistant", "content": "b"}]
    assert rules.prompt_text(chat) == "last"
    assert rules.prompt_text("plain") == "plain"
    assert rules.response_text(chat) == "a\nb"
    assert rules.response_text("plain") == "plain"
    with pytest.raises(ValueError, match="no user message"):
        rules.prompt_text([{"role": "system", "content": "s"}])


def test_missing_reference_raises_key_error(exact):
    question = "How many legs do " + "seventeen very particular spiders " * 5 + "have?"
    with pytest.raises(KeyError, match=re.escape(question[:60])):
        exact.score([question], ["8"])


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"question": "q2"}', "'answer'"),
        ('{"answer": "#### 3"}', "'question'"),
        ('["q", "a"]', "JSON object"),
    ],
)
def test_from_file_errors_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q1", "answer": "#### 1"})
    path.write_text(f"{good}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:") + ".*" + re.escape(message)):
        rules.GSM8KExactMatch.from_file(path)


def test_from_file_names_the_line_and_column_of_a_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "q1", "answer": "#### 1"}).encode()
    path.write_bytes(good + b'\n{"question": "caf\xe9?", "answer": "#### 2"}\n')  # Latin-1 e-acute
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: not UTF-8 text (byte 0xe9 at column 18)") + "$"):
        rules.GSM8KExactMatch.from_file(path)


def test_from_file_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q1", "answer": "#### 1"}).encode() + b"\n")
    assert rules.GSM8KExactMatch.from_file(path).references == {"q1": "1"}


def test_from_file_rejects_conflicting_duplicates(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                    + json.dumps({"question": "q ", "answer": "#### 2"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        rules.GSM8KExactMatch.from_file(path)


def test_reference_without_number_is_rejected():
    with pytest.raises(ValueError, match="no number"):
        rules.GSM8KExactMatch({"q": "unknown"})


def test_length_reward():
    responses = ["", "abcd", "x" * 10, [{"role": "assistant", "content": "ab"}, {"role": "assistant", "content": "c"}]]
    prompts = ["p"] * 4
    # Message responses are judged on "ab\nc": 4 characters.
    torch.testing.assert_close(rules.LengthReward().score(prompts, responses),
                               torch.tensor([0.0, -0.004, -0.010, -0.004]))
    torch.testing.assert_close(rules.LengthReward(per_char=0.5).score(prompts, responses),
                               torch.tensor([0.0, 2.0, 5.0, 2.0]))
    scores = rules.LengthReward(target=4).score(prompts, responses)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([-1.0, 0.0, -1.5, 0.0]))
    with pytest.raises(ValueError, match="positive"):
        rules.LengthReward(target=0)


def test_regex_reward():
    rule = rules.RegexReward(r"#### -?[\d,.]+\s*$", reward=2.0, penalty=-0.5)
    scores = rule.score(["p"] * 4, ["work\n#### 72", "#### 72 and more", "no answer", "a\nb\n#### 1,080\n"])
    assert scores.dtype == torch.float32
    assert scores.tolist() == [2.0, -0.5, -0.5, 2.0]
    # re.DOTALL: "." spans lines.
    assert rules.RegexReward("start.*end").score(["p", "p"], ["start\nmiddle\nend", "end start"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "rule",
    [rules.GSM8KExactMatch({"q": "1"}), rules.LengthReward(), rules.RegexReward("x")],
)
def test_length_mismatch_raises(rule):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rule.score(["q", "q"], ["1"])


def test_load_rule_builds_each_rule(rows):
    exact = rules.load_rule("gsm8k_exact", data=GSM8K_400)
    assert isinstance(exact, rules.GSM8KExactMatch) and len(exact.references) == 400
    assert exact.score([rows[5]["question"]], [rows[5]["answer"]]).tolist() == [1.0]
    assert isinstance(rules.load_rule("gsm8k_exact", answers={"q": "3"}), rules.GSM8KExactMatch)

    length = rules.load_rule("length", target=10)
    assert isinstance(length, rules.LengthReward) and length.score(["p"], ["x" * 5]).tolist() == [-0.5]

    regex = rules.load_rule("regex", pattern="####", penalty=-1.0)
    assert isinstance(regex, rules.RegexReward) and regex.score(["p", "p"], ["#### 1", "1"]).tolist() == [1.0, -1.0]

    assert {name: cls.name for name, cls in rules.RULES.items()} == {n: n for n in rules.RULES}


def test_load_rule_rejects_unknown_names():
    with pytest.raises(ValueError, match="gsm8k_exact, length, regex"):
        rules.load_rule("bleu")
