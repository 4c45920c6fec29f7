"""The data audit (align/audit.py, `python -m align.data audit`): planted problems are found with their file:line,
clean data gives none, personal data is counted and masked but never shown, bad input stops with one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from align import audit, data, formats
from align.audit import Match
from align.config import DPOConfig, PipelineConfig, PPOConfig, SFTConfig, load_config

from helpers import ROOT, TINY

WORDS = ("river stone garden window paper orange silver market winter candle forest pocket ladder mirror basket "
         "thunder pencil island button kettle meadow violin harbor lantern saddle tunnel velvet anchor blanket "
         "copper dragon feather glacier hammer jungle kitten lemon magnet needle ocean parrot quartz rocket "
         "shadow tiger umbrella valley walnut yogurt zebra bridge castle desert engine falcon ginger helmet").split()
EMAIL, PHONE, CARD = "jane.doe@example.org", "(415) 555-0132", "4111 1111 1111 1111"
NOT_A_CARD = "4111 1111 1111 1112"  # fails the Luhn check


def sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sft_rows(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng), "completion": sentence(rng, 30)} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(cls, stage: str, train: Path, **data_cfg):
    layer = {"output_dir": "unused", "model": {"name_or_path": str(TINY), "init": "random"},
             "data": {"train": {"path": str(train)}, **data_cfg}}
    if stage in ("ppo", "grpo"):
        layer["reward"] = {"rule": "length"}
    return load_config(cls, layers=[layer])


def test_finds_planted_exact_and_near_duplicates_with_their_lines(tmp_path):
    rows = sft_rows()
    near = dict(rows[5], completion=rows[5]["completion"].rsplit(" ", 1)[0] + " zebra")  # one word of 44 changed
    path = write_jsonl(tmp_path / "train.jsonl", rows + [dict(rows[3]), near])
    report = audit.audit_stage(config(SFTConfig, "sft", path), "sft")
    stage = report.stages[0]
    assert stage.exact_duplicates == [Match(f"{path}:13", f"{path}:4")]
    assert [(m.at, m.other, m.kind) for m in stage.near_duplicates] == [(f"{path}:14", f"{path}:6", "near")]
    assert 0.8 <= stage.near_duplicates[0].similarity < 1
    assert report.counts["exact_duplicates"] == 1 and report.counts["near_duplicates"] == 1
    # Below the threshold it is no near duplicate.
    strict_cfg = config(SFTConfig, "sft", path)
    strict_cfg.audit.near_duplicate_threshold = 0.99
    strict = audit.audit_stage(strict_cfg, "sft")
    assert strict.counts["near_duplicates"] == 0 and strict.counts["exact_duplicates"] == 1


def test_reports_nothing_on_clean_data(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    val = write_jsonl(tmp_path / "val.jsonl", sft_rows(4, seed=1))
    report = audit.audit_stage(config(SFTConfig, "sft", path, validation={"path": str(val)}), "sft")
    counts = report.counts
    assert counts["records"] == 16 and counts["files"] == 2
    for key in ("exact_duplicates", "near_duplicates", "leaks", "contradictory_pairs", "empty_responses",
                "personal_data", "skipped"):
        assert counts[key] == 0, key
    assert counts["truncated"] is None  # no tokenizer given
    assert [(f.role, f.format, f.records) for f in report.files] == [("train", "prompt_completion", 12),
                                                                     ("validation", "prompt_completion", 4)]


def test_a_validation_record_in_the_training_data_is_a_leak(tmp_path):
    rows = sft_rows()
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", sft_rows(3, seed=1) + [dict(rows[7])])
    report = audit.audit_stage(config(SFTConfig, "sft", path, validation={"path": str(val)}), "sft")
    assert report.leaks == 1 and report.counts["leaks"] == 1
    assert report.stages[0].leaks == [Match(f"{val}:4", f"{path}:8")]


def test_ppo_held_out_prompts_that_are_training_prompts_are_leaks(tmp_path):
    rng = random.Random(3)
    prompts = [{"prompt": sentence(rng)} for _ in range(10)]
    path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    near = {"prompt": prompts[2]["prompt"] + " please"}  # 14 words + 1: Jaccard 9/10 of the 5-grams
    val = write_jsonl(tmp_path / "held.jsonl", [{"prompt": sentence(rng)}, dict(prompts[4]), near])
    report = audit.audit_stage(config(PPOConfig, "ppo", path, validation={"path": str(val)}), "ppo")
    leaks = report.stages[0].leaks
    assert [(m.at, m.other, m.kind) for m in leaks] == [(f"{val}:2", f"{path}:5", "exact"),
                                                       (f"{val}:3", f"{path}:3", "near")]


def test_contradictory_pairs_and_the_share_of_longer_chosen_responses(tmp_path):
    rng = random.Random(4)
    rows = [{"prompt": sentence(rng), "chosen": sentence(rng, 20), "rejected": sentence(rng, 10)} for _ in range(6)]
    rows[1]["chosen"], rows[1]["rejected"] = sentence(rng, 5), sentence(rng, 25)  # one pair whose chosen is shorter
    flipped = {"prompt": rows[2]["prompt"], "chosen": rows[2]["rejected"], "rejected": rows[2]["chosen"]}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows + [flipped])
    report = audit.audit_stage(config(DPOConfig, "dpo", path), "dpo")
    pref = report.stages[0].preference
    assert pref.contradictory == [Match(f"{path}:7", f"{path}:3")]
    assert report.counts["contradictory_pairs"] == 1
    # Longer chosen: rows 0, 2, 3, 4, 5 (5 of 7 pairs); row 1 and the flipped row have a shorter chosen response.
    assert pref.pairs == 7 and report.counts["chosen_longer_share"] == round(5 / 7, 4)


def test_personal_data_is_counted_by_line_and_never_shown(tmp_path):
    rows = sft_rows(9)
    rows[2]["completion"] += f" write to {EMAIL} today"
    rows[4]["prompt"] += f"\ncall me at {PHONE}"  # after a JSON escape (\n) in the file
    rows[6]["completion"] += f" my card is {CARD}."
    rows[7]["completion"] += f" order {NOT_A_CARD} shipped"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    report = audit.audit_stage(config(SFTConfig, "sft", path), "sft")
    assert report.personal[0].found == {"email": [3], "phone": [5], "card": [7]}
    assert (report.counts["personal_data"], report.counts["emails"], report.counts["phone_numbers"],
            report.counts["card_numbers"]) == (3, 1, 1, 1)
    report.write(tmp_path / "out")
    out = tmp_path / "out"
    shown = [report.summary(), (out / "audit.md").read_text(), (out / "audit.json").read_text()]
    for text in shown:
        for value in (EMAIL, PHONE, CARD, "0132", "jane.doe", "1111 1111"):
            assert value not in text
    assert "lines 5" in shown[1] and json.loads(shown[2])["counts"]["personal_data"] == 3


def test_personal_data_counts_only_the_records_a_recipe_reads(tmp_path):
    rows = sft_rows(10)
    rows[7]["completion"] += f" write to {EMAIL}"  # line 8
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first = audit.audit_stage(config(SFTConfig, "sft", path), "sft")
    assert first.counts["emails"] == 1

    def emails(**source):
        layer = {"output_dir": "unused", "model": {"name_or_path": str(TINY), "init": "random"},
                 "data": {"train": {"path": str(path), **source}}}
        return audit.audit_stage(load_config(SFTConfig, layers=[layer]), "sft").counts["emails"]

    assert emails(limit=5) == 0 and emails(offset=7, limit=2) == 1


def test_masking_leaves_every_other_byte_alone():
    line = f'{{"a": "mail {EMAIL}, tel {PHONE}\\n+44 20 7946 0958 or {CARD}; not {NOT_A_CARD} 2020-05-01 x"}}'
    masked = audit.mask_personal(line)
    assert masked == ('{"a": "mail [EMAIL], tel [PHONE]\\n[PHONE] or [CARD]; not ' + NOT_A_CARD
                      + ' 2020-05-01 x"}')
    assert json.loads(masked)  # still valid JSON


def recipe(tmp_path: Path, train: Path, name: str = "sft_test.yaml", **data_cfg) -> Path:
    path = tmp_path / name
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(TINY), "init": "random"},
           "data": {"train": {"path": str(train)}, "max_length": 64, **data_cfg}}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run_audit(args: list[str], capsys) -> tuple[int, list[str], list[str]]:
    code = audit.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_clean_writes_masked_copies_otherwise_identical_and_never_overwrites(tmp_path, capsys):
    rows = sft_rows(6)
    rows[1]["completion"] += f" mail {EMAIL}"
    rows[3]["prompt"] += f" card {CARD} phone {PHONE}"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    original = path.read_bytes()
    code, out, _ = run_audit([recipe(tmp_path, path), "--clean", tmp_path / "clean"], capsys)
    assert code == 0
    masked = (tmp_path / "clean" / "train.jsonl").read_bytes()
    for value in (EMAIL, CARD, PHONE):
        assert value.encode() not in masked
    expected = original.replace(EMAIL.encode(), b"[EMAIL]").replace(CARD.encode(), b"[CARD]")
    assert masked == expected.replace(PHONE.encode(), b"[PHONE]")
    assert path.read_bytes() == original
    assert json.loads(out[-1])["personal_data"] == 3
    # A second run would replace the copy: refused with one line, exit 2, the copy untouched.
    code, out, err = run_audit([recipe(tmp_path, path), "--clean", tmp_path / "clean"], capsys)
    assert code == 2 and len(err) == 1 and "exists" in err[0] and not out
    assert (tmp_path / "clean" / "train.jsonl").read_bytes() == masked


def test_command_line_prints_the_counts_json_last_and_writes_the_report(tmp_path):
    rows = sft_rows()
    path = write_jsonl(tmp_path / "train.jsonl", rows + [dict(rows[0])])
    done = subprocess.run([sys.executable, "-m", "align.data", "audit", str(recipe(tmp_path, path)),
                           "data.max_length=32", "--out", str(tmp_path / "audit")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["records"] == 13 and counts["exact_duplicates"] == 1 and counts["leaks"] == 0
    assert counts["truncated"] is not None  # the CLI loads the recipe's tokenizer
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["counts"] == counts
    assert "# Data audit" in (tmp_path / "audit" / "audit.md").read_text()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(sft_rows(1)[0]) + "\n" + '{"prompt": "hi", "completion": }\n')
    code, out, err = run_audit([recipe(tmp_path, path), "--out", tmp_path / "out", "--clean", tmp_path / "clean"],
                               capsys)
    assert code == 2 and not out
    assert len(err) == 1 and f"{path}:2" in err[0] and "malformed JSON" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "clean").exists()
    path.write_text(json.dumps({"prompt": "hi", "completion": 3}) + "\n")
    code, _, err = run_audit([recipe(tmp_path, path)], capsys)
    assert code == 2 and len(err) == 1 and f"{path}:1" in err[0] and "'completion'" in err[0]
    code, _, err = run_audit([recipe(tmp_path, tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and len(err) == 1 and "missing.jsonl: file not found" in err[0]


def test_out_refuses_a_folder_holding_other_files(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run_audit([recipe(tmp_path, path), "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "notes.txt" in err[0] and not stdout
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # An empty folder, and one holding only an earlier audit, are fine.
    (out / "notes.txt").unlink()
    for _ in range(2):
        code, _, _ = run_audit([recipe(tmp_path, path), "--out", out], capsys)
        assert code == 0 and sorted(p.name for p in out.iterdir()) == ["audit.json", "audit.md"]


def test_token_lengths_are_the_stages_own_and_count_what_truncation_cuts(tmp_path, tiny_tokenizer):
    rng = random.Random(2)
    rows = [{"prompt": sentence(rng), "completion": sentence(rng, rng.randint(5, 60))} for _ in range(12)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples = formats.load_examples(config(SFTConfig, "sft", path).data.train, "sft")
    expected = [len(data.tokenize_sft_example(ex, tiny_tokenizer)) for ex in examples]
    limit = sorted(expected)[6]  # inside the distribution, so the count means something
    report = audit.audit_stage(config(SFTConfig, "sft", path, max_length=limit), "sft", tiny_tokenizer)
    lengths = report.stages[0].lengths
    assert (lengths.min, lengths.max, lengths.examples, lengths.limit) == (min(expected), max(expected), 12, limit)
    assert lengths.over == [str(ex.origin) for ex, n in zip(examples, expected) if n > limit]
    assert 0 < len(lengths.over) < 12

    rng = random.Random(5)
    pairs = [{"prompt": sentence(rng), "chosen": sentence(rng, rng.randint(3, 40)), "rejected": sentence(rng, 8)}
             for _ in range(10)]
    dpo_cfg = config(DPOConfig, "dpo", write_jsonl(tmp_path / "pairs.jsonl", pairs), max_length=60)
    report = audit.audit_stage(dpo_cfg, "dpo", tiny_tokenizer)
    got = report.stages[0].lengths
    exs = formats.load_examples(dpo_cfg.data.train, "preference")
    want = [max(len(data.tokenize_response(tiny_tokenizer, ex.prompt, r, "chat")) for r in (ex.chosen, ex.rejected))
            for ex in exs]
    assert (got.min, got.max) == (min(want), max(want))
    assert report.counts["truncated"] == sum(n > 60 for n in want) > 0


def test_skipped_empty_responses_are_counted_with_their_lines(tmp_path):
    rng = random.Random(6)
    rows = [{"prompt": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)} for _ in range(5)]
    rows[3]["chosen"] = "  "
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = config(DPOConfig, "dpo", path)
    cfg.data.train.skip_invalid = True
    report = audit.audit_stage(cfg, "dpo")
    assert report.stages[0].empty_responses == [f"{path}:4"]
    assert report.counts["empty_responses"] == 1 and report.counts["skipped"] == 1


def test_pipeline_evaluation_prompts_are_checked_against_every_stages_training_data(tmp_path):
    rows = sft_rows()
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    rng = random.Random(7)
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": sentence(rng)}, {"prompt": rows[9]["prompt"]}])
    stage = {"model": {"name_or_path": str(TINY), "init": "random"}, "data": {"train": {"path": str(train)}}}
    cfg = load_config(PipelineConfig, layers=[{"output_dir": str(tmp_path / "run"), "stages": ["sft"],
                                               "sft": {"overrides": stage},
                                               "evaluate": {"prompts": {"path": str(prompts)}}}])
    report = audit.audit_pipeline(cfg)
    assert report.evaluation_leaks == [Match(f"{prompts}:2", f"{train}:10")]
    assert report.counts["leaks"] == 1 and report.counts["records"] == 14
    assert [f.role for f in report.files] == ["train", "evaluation"]


@pytest.mark.parametrize("text", ["2020-05-01", "12 - 3 = 9 and 48/2 = 24", "1234567890123", "v1.2.3.4.5.6.7.8"])
def test_dates_sums_and_long_numbers_are_not_personal_data(text):
    assert audit.find_personal(text) == []
