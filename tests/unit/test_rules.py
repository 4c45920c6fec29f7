"""reward_models.rules: final-answer extraction on real GSM8K answers, the exact-match reward, the math-answer
reward (math-verify), the shaping rules."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from reward_models import math_answer, rules

from helpers import ROOT, shared

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
    [rules.GSM8KExactMatch({"q": "1"}), rules.MathAnswer({"q": "1"}), rules.LengthReward(), rules.RegexReward("x")],
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

    math = rules.load_rule("math_answer", data=GSM8K_400, timeout=2)
    assert isinstance(math, rules.MathAnswer) and len(math.references) == 400 and math.checker.timeout == 2
    assert math.score([rows[5]["question"]], [rows[5]["answer"]]).tolist() == [1.0]

    assert {name: cls.name for name, cls in rules.RULES.items()} == {n: n for n in rules.RULES}


def test_load_rule_rejects_unknown_names():
    with pytest.raises(ValueError, match="gsm8k_exact, length, math_answer, regex"):
        rules.load_rule("bleu")


# --------------------------------------------------------------------------------------------------------------
# math_answer


def math_score(reference: str, response: str, timeout: int = 5) -> float:
    return rules.MathAnswer({"q": reference}, timeout=timeout).score(["q"], [response]).item()


@pytest.mark.parametrize(("reference", "response"), [
    ("#### 1,000", "1000"),
    ("1000", "The total is 1,000."),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("0.5", "So the probability is $\\boxed{\\frac{1}{2}}$."),
    ("\\frac{1}{2}", "\\boxed{0.50}"),
    ("#### 18", "The answer is 18."),
    ("Each costs $3, so 6 x 3 = 18.\n#### 18", "6 * 3 = 18\n#### 18"),
    ("#### 72", "48 + 24 = 72\n#### 72\nCheck: 8 apples"),  # the line after "####" counts, not a later number
    ("The side is $\\boxed{\\frac{\\sqrt{2}}{2}}$.", "\\boxed{\\frac{1}{\\sqrt{2}}}"),
    ("\\sqrt{2}/2", "$\\frac{\\sqrt{2}}{2}$"),  # a bare LaTeX reference
    ("#### -5", "The change is -5."),
])
def test_math_answer_equal_forms_score_one(reference, response):
    assert math_score(reference, response) == 1.0


@pytest.mark.parametrize(("reference", "response"), [
    ("#### 18", "The answer is 19."),
    ("#### 1,000", "100"),
    ("\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{3}}"),
    ("0.5", "0.55"),
    ("#### 72", "48 + 24 = 72\n#### 73"),
    ("#### 5", "The change is -5."),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{\\sqrt{2}}"),
])
def test_math_answer_unequal_values_score_zero(reference, response):
    assert math_score(reference, response) == 0.0


@pytest.mark.parametrize("response", [
    "", "I do not know.", "]]]{{{\\frac{", "\\boxed{", "\\boxed{}", "\x00\ufffd\u202e", "#### ", "####", "$$$$",
    "\\frac{1}{" * 200, "(" * 5000, "x" * 100_000,
])
def test_math_answer_garbage_scores_zero_without_raising(response):
    assert math_score("#### 72", response) == 0.0


def test_math_answer_gives_up_on_an_answer_too_costly_to_check():
    # 9^(9^(9^9)) cannot be evaluated; the timeout stops the comparison and the response scores 0.
    started = time.perf_counter()
    assert math_score("#### 72", "\\boxed{9^{9^{9^{9}}}}", timeout=1) == 0.0
    assert time.perf_counter() - started < 10


def test_math_answer_on_real_gsm8k_training_rows():
    path = shared("gsm8k_train.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    rule = rules.load_rule("math_answer", data=path)
    questions = [r["question"] for r in rows]
    # A chat prompt is matched by its last user turn, like gsm8k_exact.
    chats = [[{"role": "system", "content": "Solve it."}, {"role": "user", "content": q}] for q in questions]
    answers = [r["answer"] for r in rows]
    assert rule.score(chats, answers).tolist() == [1.0] * 8
    wrong = [re.sub(r"####.*$", f"#### {int(rules.final_answer(a)) + 1}", a) for a in answers]
    assert rule.score(chats, wrong).tolist() == [0.0] * 8
    assert rows[0]["answer"].endswith("#### 72")
    assert rule.score(chats[:1], ["She sold 48 + 24 clips, so the answer is $\\boxed{72}$."]).tolist() == [1.0]


def test_math_answer_scores_the_same_from_another_thread():
    # Off the main thread math-verify's signal timeouts cannot work: the check runs in a worker process instead.
    rule = rules.MathAnswer({"q": "\\boxed{\\frac{1}{2}}", "g": "#### 1,000"}, timeout=2)
    prompts = ["q", "q", "g", "g", "q"]
    responses = ["0.5", "0.4", "The answer is 1,000.", "999", "]]{{garbage"]
    result = {}
    worker = threading.Thread(target=lambda: result.update(scores=rule.score(prompts, responses).tolist()))
    worker.start()
    worker.join(timeout=120)
    try:
        assert result.get("scores") == [1.0, 0.0, 1.0, 0.0, 0.0]
        assert rule.checker._worker is not None and rule.checker._worker.poll() is None
    finally:
        rule.checker.close()


def test_math_answer_worker_that_does_not_answer_is_restarted_and_scores_zero(monkeypatch):
    checker = math_answer.Checker(timeout=1)
    try:
        assert checker._in_worker("0.5", "\\frac{1}{2}") is True  # the worker path, called directly
        first = checker._worker
        monkeypatch.setattr(math_answer.select, "select", lambda r, w, x, timeout: ([], [], []))
        assert checker._in_worker("0.5", "\\frac{1}{2}") is False
        assert checker._worker is None and first.poll() is not None  # killed
        monkeypatch.undo()
        assert checker._in_worker("0.5", "\\frac{1}{2}") is True  # a fresh worker
    finally:
        checker.close()


def test_math_answer_bad_references_are_errors():
    with pytest.raises(ValueError, match="no number after '####'"):
        rules.MathAnswer({"q": "#### unknown"})
    with pytest.raises(ValueError, match="empty"):
        rules.MathAnswer({"q": "  "})
    rule = rules.MathAnswer({"What is it?": "The answer is \\boxed{}."})  # parsed lazily, so at the first score
    with pytest.raises(ValueError, match=re.escape("question 'What is it?': math-verify finds no answer")):
        rule.score(["What is it?"], ["1"])
    with pytest.raises(ValueError, match="timeout must be a positive whole number"):
        rules.MathAnswer({"q": "1"}, timeout=0)


def test_format_reward_on_gsm8k_text():
    # A format term to add to math_answer: the response ends on a GSM8K answer line.
    path = shared("gsm8k_train.jsonl")
    with open(path, encoding="utf-8") as f:
        answers = [json.loads(next(f))["answer"] for _ in range(5)]
    rule = rules.load_rule("regex", pattern=r"####\s*-?[\d,.]+\s*$")
    assert rule.score(["p"] * 5, answers).tolist() == [1.0] * 5
    others = ["The answer is 72.", "#### 72\nI hope that helps!", "#### seventy-two", "#### -1,080.5\n", "####72"]
    assert rule.score(["p"] * 5, others).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
