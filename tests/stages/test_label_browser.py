"""align.label as people use it: the real server (python -m align.label), driven by a real browser (Debian's
chromium, headless, through Playwright) or by plain HTTP clients, then align.rm on the file it wrote.

Without chromium or Playwright these tests are skipped, unless ALIGN_TESTS_NEED_BROWSER=1 (make test sets it, and
installs both) makes that a failure. ALIGN_LABEL_SCREENSHOT=PATH saves the ranking page's screenshot there (the
README's picture)."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from helpers import ROOT, LabelServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        missing = "chromium (apt-get install chromium)" if CHROMIUM is None else "playwright (pip install playwright)"
        if os.environ.get("ALIGN_TESTS_NEED_BROWSER") == "1":
            pytest.fail(f"ALIGN_TESTS_NEED_BROWSER=1 but {missing} is missing")
        pytest.skip(f"{missing} is missing")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    context.close()


def shown(page) -> dict[str, str]:
    """letter -> the response text the page shows under it."""
    return {a.get_attribute("data-letter"): a.locator(".text").inner_text() for a in page.locator("article").all()}


CANDIDATES = [
    {"prompt": "How do I boil an egg?", "responses": ["Put it in boiling water for 8 minutes.",
                                                      "Boil water, add the egg, wait about 8 minutes.",
                                                      "Eggs are for breakfast."]},
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon.", "I like trains."],
     "policies": ["sft", "dpo", "sft"]},
    {"prompt": "Write a haiku about rain.", "responses": ["Rain taps the window / ...", "No."]},
]


def test_an_annotator_ranks_three_items_in_a_browser_and_align_rm_trains_on_the_file(tmp_path, page):
    cands = write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    out = tmp_path / "rankings.jsonl"
    server = LabelServer("rank", "--candidates", str(cands), "--out", str(out))
    page.goto(server.url)
    page.fill("input[name=annotator]", "ann")
    page.click("text=Start")
    assert page.locator("#progress").inner_text() == "ann: 0 done · items complete 0 / 3"

    # 1: by keyboard, a tie between the two good answers: pick each letter, type its rank, Enter
    want = {CANDIDATES[0]["responses"][0]: 1, CANDIDATES[0]["responses"][1]: 1, CANDIDATES[0]["responses"][2]: 2}
    for letter, text in shown(page).items():
        page.keyboard.press(letter.lower())
        page.keyboard.press(str(want[text]))
    if os.environ.get("ALIGN_LABEL_SCREENSHOT"):
        page.screenshot(path=os.environ["ALIGN_LABEL_SCREENSHOT"])
    page.keyboard.press("Enter")
    page.wait_for_selector("text=ann: 1 done")

    # 2: by mouse, a strict order
    want = {"Paris.": 1, "Lyon.": 2, "I like trains.": 3}
    for letter, text in shown(page).items():
        page.locator(f"#response-{letter} input[value='{want[text]}']").check()
    page.click("#submit")
    page.wait_for_selector("text=ann: 2 done")

    # 3: skipped
    page.click("#skip")
    page.wait_for_selector("text=All done, ann")

    answers = lines(out)  # exactly these three answers, in order, each against the right responses
    assert [a["label"] for a in answers] == ["rank", "rank", "skip"]
    assert answers[0]["ranks"] == [1, 1, 2] and answers[1]["ranks"] == [1, 2, 3]
    assert answers[1]["policies"] == ["sft", "dpo", "sft"]
    assert [a["responses"] for a in answers] == [c["responses"] for c in CANDIDATES]
    assert {a["annotator"] for a in answers} == {"ann"} and "ranks" not in answers[2]
    printed = server.stop()
    assert json.loads(printed.strip().splitlines()[-1])["annotators"] == {"ann": {"ranked": 2, "skipped": 1,
                                                                                   "flagged": 0}}

    # align.rm reads the file as it is: 2 + 3 ordered pairs (the tie gives none), the skip counted, one step
    run = subprocess.run([sys.executable, "-m", "align.rm", "recipes/tiny/rm.yaml", f"output_dir={tmp_path / 'rm'}",
                          "overwrite=false", f"data.train.path={out}", "data.train.skip_invalid=false",
                          "data.train.limit=null", "data.validation_fraction=0", "train.max_steps=1",
                          "train.batch_size=2", "train.micro_batch_size=2", "log.progress=false"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "rm" / "report.json").read_text())
    assert report["steps"] == 1
    assert "1 x skipped by the annotator" in run.stdout


def test_script_and_img_onerror_in_a_response_are_shown_as_text_and_run_nothing(tmp_path, page):
    evil = ["<script>window.pwned = 1; alert('script ran')</script>",
            '<img src="x" onerror="window.pwned = 2; alert(\'onerror ran\')">']
    cands = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "<script>window.pwned = 3</script>", "responses": evil}])
    server = LabelServer("rank", "--candidates", str(cands), "--out", str(tmp_path / "r.jsonl"))
    page.goto(server.url + "?annotator=ann")
    assert sorted(shown(page).values()) == sorted(evil)  # the markup, character for character, as text
    assert page.locator(".prompt .text").inner_text() == "<script>window.pwned = 3</script>"
    assert page.locator("article img").count() == 0 and page.locator("article script").count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None and page.dialogs == []
    server.stop()


def test_with_six_responses_the_letters_f_and_s_pick_responses_and_shift_skips_or_flags(tmp_path, page):
    responses = [f"answer number {i}" for i in range(6)]
    cands = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Pick one", "responses": responses},
                                               {"prompt": "Another", "responses": ["x", "y"]}])
    out = tmp_path / "r.jsonl"
    server = LabelServer("rank", "--candidates", str(cands), "--out", str(out))
    page.goto(server.url + "?annotator=ann")
    for letter, rank in zip("ABCDEF", "654321"):  # F gets rank 1, by keys alone
        page.keyboard.press(letter.lower())
        page.keyboard.press(rank)
    assert page.locator("#response-F input[value='1']").is_checked()
    assert page.evaluate("document.activeElement.id") != "reason"
    page.keyboard.press("Enter")
    page.wait_for_selector("text=ann: 1 done")
    page.keyboard.press("Shift+S")
    page.wait_for_selector("text=All done, ann")
    server.stop()
    first, second = lines(out)
    shown_f = first["shown"][5]  # the response the page showed as F
    assert first["label"] == "rank" and first["ranks"][shown_f] == 1 and sorted(first["ranks"]) == [1, 2, 3, 4, 5, 6]
    assert second["label"] == "skip"


def test_killing_the_server_after_two_answers_loses_nothing_and_a_restart_shows_the_third_item(tmp_path, page):
    cands = write_jsonl(tmp_path / "c.jsonl", CANDIDATES)
    out = tmp_path / "r.jsonl"
    server = LabelServer("rank", "--candidates", str(cands), "--out", str(out))
    page.goto(server.url + "?annotator=ann")
    page.click("#skip")
    page.wait_for_selector("text=ann: 1 done")
    page.fill("#reason", "the answers are nonsense")
    page.click("#flag")
    page.wait_for_selector("text=ann: 2 done")
    server.kill()
    assert [a["label"] for a in lines(out)] == ["skip", "flag"]

    server = LabelServer("rank", "--candidates", str(cands), "--out", str(out))
    assert "2 answers so far" in "".join(server.output)
    page.goto(server.url + "?annotator=ann")
    assert page.locator(".prompt .text").inner_text() == CANDIDATES[2]["prompt"]
    assert page.locator("#progress").inner_text().startswith("ann: 2 done")
    server.stop()
    assert len(lines(out)) == 2


def test_two_annotators_in_parallel_write_whole_lines_and_the_agreement_matches_a_hand_count(tmp_path):
    import httpx

    n = 20
    cands = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"question {i}", "responses": [f"a{i}", f"b{i}", f"c{i}"]}
                                               for i in range(n)])
    out = tmp_path / "r.jsonl"
    server = LabelServer("rank", "--candidates", str(cands), "--out", str(out), "--per-item", "2")

    def annotate(name, reverse_from):
        """Ranks a > b > c, except from item `reverse_from` on: c > b > a."""
        with httpx.Client(base_url=server.url) as client:
            for _ in range(n):
                page = client.get("/", params={"annotator": name}).text
                item = re.search(r'name="item" value="(\w+)"', page).group(1)
                texts = re.findall(r'<div class="text">([abc])(\d+)</div>', page)
                i = int(texts[0][1])
                order = "cba" if i >= reverse_from else "abc"
                form = {"item": item, "annotator": name, "action": "rank"}
                form.update({f"rank_{'ABC'[pos]}": str(order.index(t) + 1) for pos, (t, _) in enumerate(texts)})
                response = client.post("/answer", data=form)
                if response.status_code != 303:  # recorded, and sent on to the next item
                    errors.append(f"{name}: {response.status_code} {response.text[:200]}")

    errors = []
    threads = [threading.Thread(target=annotate, args=("ann", n)), threading.Thread(target=annotate, args=("bob", 10))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = json.loads(server.stop().strip().splitlines()[-1])
    assert errors == []

    answers = lines(out)  # every line parses: none torn or interleaved
    assert len(answers) == 2 * n
    assert sorted((a["annotator"], a["item"]) for a in answers) == sorted(
        {(a["annotator"], a["item"]) for a in answers})
    # Hand count: items 0-9 both rank a > b > c (3 of 3 response pairs agree, W = 1); items 10-19 bob reverses
    # (0 of 3 agree; rank sums 4, 4, 4, so S = 0 and W = 0). Agreement 30 / 60, mean W (10 * 1 + 10 * 0) / 20.
    assert summary["pairwise_agreement"] == {"agreement": 0.5, "comparisons": 60, "items": 20}
    assert summary["kendall_w"] == {"mean": 0.5, "items": 20}


def test_a_person_judges_candidate_against_baseline_and_the_win_rate_matches_a_hand_computation(tmp_path, page):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "candidate": f"candidate answer {i}",
             "baseline": f"baseline answer {i}", "reward_candidate": r, "reward_baseline": 0.0}
            for i, r in enumerate([1.0, 1.0, -1.0, 1.0, -1.0])]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "verdicts.jsonl"
    server = LabelServer("compare", "--samples", str(samples), "--out", str(out))
    page.goto(server.url + "?annotator=ann")
    human = ["candidate", "candidate", "tie", "baseline", "candidate"]  # what the person thinks of items 0..4
    for i, verdict in enumerate(human):
        texts = shown(page)
        assert sorted(texts.values()) == [f"baseline answer {i}", f"candidate answer {i}"]
        if verdict == "tie":
            page.keyboard.press("2")
        else:
            letter = next(k for k, v in texts.items() if v.startswith(verdict))
            page.keyboard.press("1" if letter == "A" else "3")
        page.wait_for_selector(f"text=ann: {i + 1} done" if i < len(human) - 1 else "text=All done, ann")
    summary = json.loads(server.stop().strip().splitlines()[-1])
    assert [a["verdict"] for a in lines(out)] == human

    # human outcomes 1, 1, 1/2, 0, 1: rate 3.5 / 5 = 0.7; Wilson with z = 1.96: centre (0.7 + z^2/10) / (1 + z^2/5),
    # half z / (1 + z^2/5) * sqrt(0.7 * 0.3 / 5 + z^2 / 100)
    z = 1.959963984540054
    centre = (0.7 + z * z / 10) / (1 + z * z / 5)
    half = z / (1 + z * z / 5) * (0.7 * 0.3 / 5 + z * z / 100) ** 0.5
    assert summary["human_win_rate"] == pytest.approx(0.7)
    assert summary["human_win_rate_ci95"] == pytest.approx([centre - half, centre + half])
    # the judge (reward differences 1, 1, -1, 1, -1): candidate, candidate, baseline, candidate, baseline -> 3 / 5;
    # it matches the person on items 0 and 1 only (2: tie vs baseline, 3 and 4 opposite): 2 / 5
    assert summary["judge_win_rate"] == pytest.approx(0.6)
    assert summary["human_judge_agreement"] == pytest.approx(2 / 5)
