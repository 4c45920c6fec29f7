"""The model card (align/card.py): rendered from the report.json of real tiny runs of each stage, then parsed back
(YAML front matter, markdown tables) and compared with the report, the config and the data files."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re

import numpy as np
import pytest
import yaml

from align import card
from align.config import STAGES, load_config
from align.train import flat_settings

from helpers import ROOT

TINY = {
    "sft": ["train.max_steps=2"],
    "rm": ["train.max_steps=2"],
    "dpo": ["train.max_steps=2", "reference_cache=false"],
    "ppo": ["train.max_steps=2", "eval_samples=8"],
}


def _reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stage -> (cfg, report.json's content) of one short run of each tiny recipe."""
    import importlib

    os.environ.setdefault("ALIGN_AUTO_PRECISION", "fp32")
    root = tmp_path_factory.mktemp("card_runs")
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes name their data and model relative to the repository
    out = {}
    try:
        for stage, overrides in TINY.items():
            _reset_accelerate()
            cfg = load_config(STAGES[stage], f"recipes/tiny/{stage}.yaml",
                              [f"output_dir={root / stage}", "log.progress=false", "log.report_to=[]", *overrides])
            importlib.import_module(f"align.{stage}").main(cfg)
            out[stage] = (cfg, json.loads((root / stage / "report.json").read_text()))
    finally:
        _reset_accelerate()
        os.chdir(cwd)
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading a card back


def split_card(text: str) -> tuple[dict, str]:
    """(front matter as YAML, markdown) of a card that starts with `---`."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def section(body: str, title: str) -> str:
    """The markdown under `## title`, up to the next `## ` heading."""
    start = body.index(f"\n## {title}\n") + len(title) + 5
    end = body.find("\n## ", start)
    return body[start:] if end < 0 else body[start:end]


def tables(text: str) -> list[list[dict]]:
    """Every markdown table in `text`, each as a list of {header: cell}."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            header = cells_of(lines[i])
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = cells_of(lines[i])
                rows.append(dict(zip(header, cells)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def cells_of(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def by_first_column(rows: list[dict]) -> dict[str, dict]:
    key = next(iter(rows[0]))
    return {row[key]: row for row in rows}


def shows(cell: str, value) -> bool:
    """The card shows `value`: its formatted text, and (numbers) a float within the 4 digits shown."""
    if cell != card.num(value):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        return float(cell) == pytest.approx(value, rel=5e-4, abs=1e-12)
    return True


def shows_interval(cell: str, ci) -> bool:
    lo, hi = (part.strip() for part in cell.strip("[]").split(","))
    return shows(lo, ci[0]) and shows(hi, ci[1])


# --------------------------------------------------------------------------------------------------------------
# The header


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_front_matter_parses_and_names_base_library_license_tags_and_pipeline_per_stage(runs, stage):
    cfg, report = runs[stage]
    meta, body = split_card(card.render(cfg, stage, report))
    assert meta["base_model"] == cfg.model.name_or_path == "recipes/tiny/model"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "unknown"  # the Hub's id for a license nobody stated
    assert meta["tags"][:2] == ["align", stage]
    assert meta["pipeline_tag"] == ("text-classification" if stage == "rm" else "text-generation")
    assert ("reward-model" in meta["tags"]) == (stage == "rm")
    assert "datasets" not in meta and "language" not in meta  # empty lists are left out
    assert body.startswith(card.MARKER)
    for title in ("Training", "Data", "Data audit", "Evaluation on held-out data", "Forgetting check",
                  "Early stopping", "Intended use", "Limitations"):
        assert f"\n## {title}\n" in body, title


def test_header_takes_the_recipes_card_section(runs):
    cfg, report = runs["dpo"]
    cfg = copy.deepcopy(cfg)
    cfg.card.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg.card.license, cfg.card.datasets, cfg.card.language = "Apache-2.0", ["Anthropic/hh-rlhf"], ["en"]
    cfg.card.tags = ["dpo", "harmless"]
    cfg.loss.type = "ipo"
    meta, body = split_card(card.render(cfg, "dpo", report))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["Anthropic/hh-rlhf"] and meta["language"] == ["en"]
    assert meta["tags"] == ["align", "dpo", "ipo", "harmless"]  # the stage's, the variant's, the user's; no repeats
    assert "`base_model` is a local path" not in body

    cfg.card.license = "ACME Research License 1.0"  # not a Hub id: `other`, named
    meta, body = split_card(card.render(cfg, "dpo", report))
    assert meta["license"] == "other" and meta["license_name"] == "acme-research-license-1.0"
    assert "ACME Research License 1.0" in body


def test_adapter_folders_say_peft_and_merged_ones_transformers(runs, tmp_path):
    cfg, report = runs["sft"]
    lora = copy.deepcopy(cfg)
    lora.lora.enabled = True
    assert split_card(card.render(lora, "sft", report, "model"))[0]["library_name"] == "peft"
    assert split_card(card.render(lora, "sft", report, "best"))[0]["library_name"] == "peft"
    assert split_card(card.render(lora, "sft", report, "merged"))[0]["library_name"] == "transformers"
    assert "lora" in split_card(card.render(lora, "sft", report, "merged"))[0]["tags"]
    # write() looks at the folder itself
    (tmp_path / "adapter_config.json").write_text("{}")
    path = card.write(tmp_path, cfg, "sft", report, "model")
    assert split_card(path.read_text())[0]["library_name"] == "peft"
    with pytest.raises(ValueError):
        card.render(cfg, "sft", report, "final")


# --------------------------------------------------------------------------------------------------------------
# Every number is the report's


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_every_held_out_number_equals_the_reports(runs, stage):
    cfg, report = runs[stage]
    _, body = split_card(card.render(cfg, stage, report))
    found = tables(section(body, "Evaluation on held-out data"))
    rows = by_first_column(found[0])
    if stage == "ppo":
        expected = {k: (report["before"].get(k), v, None) for k, v in report["after"].items()}
        assert "reward/val" in expected and "kl/val" in expected
    else:
        expected = {k: (report.get(f"{k}_before"), v, report.get("validation", {}).get("ci95")
                        if stage == "rm" and k == "val_accuracy" else None)
                    for k, v in report.items() if k.startswith("val_") and not k.endswith("_before")
                    and not isinstance(v, dict)}
    assert set(rows) == set(expected) and len(rows) >= 1
    for key, (before, after, ci) in expected.items():
        assert shows(rows[key]["before"], before), (key, rows[key], before)
        assert shows(rows[key]["after"], after), (key, rows[key], after)
        if ci is None:
            assert rows[key]["95% CI (after)"] == card.NOT_MEASURED
        else:
            assert shows_interval(rows[key]["95% CI (after)"], ci)
    if stage == "rm":  # the reward model's full held-out report, with its bootstrap interval and length split
        detail = by_first_column(found[1])
        validation = report["validation"]
        for key in ("accuracy", "n", "groups", "ece", "length_heuristic_accuracy", "accuracy_best_vs_worst"):
            assert shows(detail[key]["value"], validation[key]), key
        assert shows_interval(detail["accuracy"]["95% CI / count"], validation["ci95"])
        for split, cell in validation["length_bias"].items():
            row = detail[f"length_bias.{split}.accuracy"]
            assert shows(row["value"], cell["accuracy"]) and row["95% CI / count"] == f"n = {cell['n']}"
    if stage == "dpo" and "val_by_length" in report:  # accuracy split by which response is longer, before and after
        split = by_first_column(found[1])
        before, after = report["val_by_length_before"], report["val_by_length"]
        for bucket in ("chosen_longer", "chosen_shorter", "same_length"):
            row = split[f"{bucket}.accuracy"]
            assert shows(row["before"], before[bucket]["accuracy"]) and shows(row["after"], after[bucket]["accuracy"])
            assert row["pairs"] == str(after[bucket]["n"])
        row = split["shorter_wins_heuristic"]
        assert shows(row["before"], before["shorter_wins_heuristic"])
        assert shows(row["after"], after["shorter_wins_heuristic"])


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_training_settings_and_results_equal_the_config_and_report(runs, stage):
    cfg, report = runs[stage]
    _, body = split_card(card.render(cfg, stage, report))
    training = section(body, "Training")
    settings = by_first_column(tables(training)[0])
    flat = flat_settings(cfg)
    for key, row in settings.items():
        value = flat[key]
        assert row["value"] == card.setting(value), key
        if not isinstance(value, str):
            assert json.loads(row["value"]) == value
    must = {"sft": ["data.loss_on"], "rm": ["loss.type"], "dpo": ["loss.type", "loss.beta"],
            "ppo": ["algorithm.advantage", "algorithm.kl_coef", "algorithm.clip_eps", "rollout.n"]}[stage]
    assert {"train.learning_rate", "train.batch_size", "train.max_steps", *must} <= set(settings)
    assert "train.epochs" not in settings  # max_steps overrides it
    steps = report.get("steps", report.get("iterations"))
    assert f"Run: {steps} " in training
    if "train_loss" in report:
        assert f"train_loss {card.num(report['train_loss'])}" in training


def test_data_files_are_listed_with_their_sha256_and_record_range(runs):
    for stage, (cfg, report) in runs.items():
        _, body = split_card(card.render(cfg, stage, report))
        rows = by_first_column(tables(section(body, "Data"))[0])
        train = rows["data.train"]
        assert train["file"] == cfg.data.train.path
        assert train["sha256"] == hashlib.sha256((ROOT / cfg.data.train.path).read_bytes()).hexdigest()
        assert train["offset"] == str(cfg.data.train.offset) and train["limit"] == str(cfg.data.train.limit)
        assert train["examples used"] == str(report["data"]["train"]["total"])
        assert rows["data.validation"]["examples used"] == str(report["data"]["validation"]["total"])


# Reports of the shapes the audit, the forgetting check and early stopping write (align/audit.py, forgetting.py,
# train.Watch), with numbers no run here produces.
AUDIT = {"records": 96, "exact_duplicates": 2, "near_duplicates": 5, "leaks": 1, "contradictory_pairs": 0,
         "personal_data": 3, "empty_responses": 0}
FORGETTING = {"text_loss": {"before": 2.71828, "after": 2.98765, "rise": 0.26937, "ci95": [0.1234, 0.41516]},
              "text_ppl": {"before": 15.1543, "after": 19.8412},
              "kl_from_start": {"value": 0.083721, "ci95": [0.0612, 0.10533]},
              "exact_match": {"before": 0.4375, "after": 0.3125, "drop": 0.125, "ci95": [0.03125, 0.21875],
                              "questions": 16},
              "records": 200, "prompts": 64, "flags": ["general-text loss rose by 0.2694 (> 0.1)"], "flagged": True}
EARLY = {"metric": "loss/val", "mode": "min", "patience": 2, "min_delta": 0.0, "stopped_at": 6, "best_step": 2,
         "best": 0.693147, "evaluations": 4, "reason": "loss/val did not improve on 0.693147 (step 2) by more than 0 "
                                                       "in 2 evaluations"}


def test_audit_forgetting_and_early_stopping_numbers_equal_the_reports(runs):
    cfg, report = runs["dpo"]
    report = {**report, "audit": AUDIT, "forgetting": FORGETTING, "early_stopping": EARLY,
              "final_model": "best (step 2)", "length_warning": "accuracy is carried by length: 'longer wins' "
                                                                "alone scores 0.81"}
    _, body = split_card(card.render(cfg, "dpo", report))

    audit = by_first_column(tables(section(body, "Data audit"))[0])
    assert set(audit) == set(AUDIT)
    assert all(audit[k]["count"] == str(v) for k, v in AUDIT.items())

    forgetting = section(body, "Forgetting check")
    rows = by_first_column(tables(forgetting)[0])
    assert set(rows) == {"text_loss", "text_ppl", "kl_from_start", "exact_match"}
    for name, m in FORGETTING.items():
        if not isinstance(m, dict):
            continue
        row = rows[name]
        assert shows(row["before"], m.get("before")) and shows(row["after"], m.get("after"))
        change = next((m[k] for k in ("rise", "drop", "value") if k in m), None)
        assert shows(row["change (rise, drop or value)"], change)
        if "ci95" in m:
            assert shows_interval(row["95% CI of the change"], m["ci95"])
        else:
            assert row["95% CI of the change"] == card.NOT_MEASURED
    assert "records 200, prompts 64, exact_match.questions 16" in forgetting and "Flagged: yes" in forgetting

    early = by_first_column(tables(section(body, "Early stopping"))[0])
    for key, value in EARLY.items():
        assert early[key]["value"] == (value if isinstance(value, str) else card.num(value)), key
    assert "Final model: best (step 2)." in section(body, "Early stopping")
    assert "After training means the model kept: best (step 2)." in section(body, "Evaluation on held-out data")

    limits = section(body, "Limitations")
    assert FORGETTING["flags"][0] in limits
    assert report["length_warning"] in limits
    assert "Data audit: 1 held-out records also in the training data" in limits
    assert "Data audit: 3 personal-data findings" in limits
    assert "contradictory" not in limits  # a count of 0 is not a limit


def test_missing_sections_say_not_measured_and_never_crash(runs):
    cfg, report = runs["sft"]
    _, body = split_card(card.render(cfg, "sft", {k: v for k, v in report.items()
                                                  if k not in ("audit", "forgetting", "early_stopping")}))
    assert card.NOT_MEASURED in section(body, "Data audit").lower()
    assert card.NOT_MEASURED in section(body, "Forgetting check").lower()
    assert "not used" in section(body, "Early stopping").lower()
    assert card.NOT_STATED in section(body, "Intended use").lower()
    assert card.NOT_STATED in section(body, "Limitations").lower()

    # an empty report (a run without held-out data, an older report.json) and partial entries still render
    _, body = split_card(card.render(cfg, "sft", {}))
    assert card.NOT_MEASURED in section(body, "Evaluation on held-out data").lower()
    assert "No held-out evaluation" in section(body, "Limitations")
    partial = {"forgetting": {"text_loss": {"after": 3.0}, "flags": []}, "audit": {"records": 5},
               "early_stopping": {"metric": "loss/val"}, "val_loss": None}
    _, body = split_card(card.render(cfg, "sft", partial))
    row = by_first_column(tables(section(body, "Forgetting check"))[0])["text_loss"]
    assert row["before"] == "n/a" and row["after"] == "3" and row["95% CI of the change"] == card.NOT_MEASURED


def test_the_user_stated_use_and_limits_are_quoted(runs):
    cfg, report = runs["ppo"]
    cfg = copy.deepcopy(cfg)
    cfg.card.intended_use = "Research on reward hacking with a length reward."
    cfg.card.limitations = "Rewards length, not quality."
    _, body = split_card(card.render(cfg, "ppo", report))
    assert section(body, "Intended use").strip() == cfg.card.intended_use
    assert cfg.card.limitations in section(body, "Limitations")
    assert "model.init=random" in section(body, "Limitations")


# --------------------------------------------------------------------------------------------------------------
# Writing: never over someone else's README.md


def test_write_never_overwrites_a_foreign_readme(runs, tmp_path):
    cfg, report = runs["sft"]
    foreign = "---\nlicense: apache-2.0\n---\n# The base model's own card\n"
    (tmp_path / "README.md").write_text(foreign)
    path = card.write(tmp_path, cfg, "sft", report)
    assert path == tmp_path / "MODEL_CARD.md" and card.is_ours(path)
    assert (tmp_path / "README.md").read_text() == foreign
    path.write_text(path.read_text() + "stale\n")
    assert card.write(tmp_path, cfg, "sft", report) == path and "stale" not in path.read_text()  # ours: replaced
    assert (tmp_path / "README.md").read_text() == foreign

    (tmp_path / "MODEL_CARD.md").write_text("someone else's\n")  # both taken: nothing is written
    assert card.write(tmp_path, cfg, "sft", report) is None
    assert (tmp_path / "MODEL_CARD.md").read_text() == "someone else's\n"
    assert (tmp_path / "README.md").read_text() == foreign

    ours = tmp_path / "ours"
    ours.mkdir()
    first = card.write(ours, cfg, "sft", report)
    assert first == ours / "README.md"
    assert card.write(ours, cfg, "sft", {**report, "val_loss": 1.5}) == first  # a rerun replaces our own card
    assert "| val_loss | " in first.read_text() and " 1.5 |" in first.read_text()
    assert not list(ours.glob(".tmp-*"))  # written atomically


def test_a_best_folder_card_says_whose_numbers_are_shown(runs):
    cfg, report = runs["dpo"]
    report = {**report, "early_stopping": EARLY, "final_model": "last"}
    _, body = split_card(card.render(cfg, "dpo", report, "best"))
    assert "output_dir/best" in body
    assert "those of output_dir/model" in section(body, "Evaluation on held-out data")


# --------------------------------------------------------------------------------------------------------------
# The pipeline's evaluation against a baseline


def eval_summary(seed: int) -> dict:
    """An evaluation summary as align.evaluate computes it (its pure statistics), with the fields main() adds."""
    from align.evaluate import summarize

    rng = np.random.default_rng(seed)
    n = 40
    summary = summarize(rng.normal(0.3, 1, n), rng.normal(0, 1, n), rng.integers(10, 60, n), rng.integers(10, 60, n),
                        rng.uniform(0, 2, n).tolist(), rng.random(n) < 0.8, rng.random(n) < 0.8)
    summary.update(baseline="runs/pipeline/sft/model", judge="runs/pipeline/rm/model",
                   sampling={"max_new_tokens": 64, "temperature": 0.7, "top_p": 1.0, "seed": 42, "engine": "hf"})
    return json.loads(json.dumps(summary))  # as eval.json holds it


def test_add_evaluation_shows_the_win_rate_with_its_interval_and_replaces_its_own_block(runs, tmp_path):
    cfg, report = runs["dpo"]
    path = card.write(tmp_path, cfg, "dpo", report)
    assert "Not measured here" in section(split_card(path.read_text())[1], "Evaluation against a baseline")
    first, second, other = eval_summary(0), eval_summary(1), eval_summary(2)

    card.add_evaluation(tmp_path, first, "Win rate against the SFT model")
    card.add_evaluation(tmp_path, other, "Win rate against the base model")
    card.add_evaluation(tmp_path, second, "Win rate against the SFT model")  # a rerun of the same evaluation
    meta, body = split_card(path.read_text())
    assert meta["library_name"] == "transformers"  # the header still parses
    part = section(body, "Evaluation against a baseline")
    assert "Not measured here" not in part
    assert part.count("### Win rate against the SFT model") == 1 and part.count("### Win rate against the base") == 1
    found = tables(part)
    assert len(found) == 2
    for rows, summary in ((found[0], second), (found[1], other)):
        rows = by_first_column(rows)
        assert shows(rows["win_rate"]["value"], summary["win_rate"])
        assert shows_interval(rows["win_rate"]["95% CI"], summary["win_rate_ci95"])
        if summary["lc_win_rate"] is not None:
            assert shows(rows["lc_win_rate"]["value"], summary["lc_win_rate"])
            assert shows_interval(rows["lc_win_rate"]["95% CI"], summary["lc_win_rate_ci95"])
        for key in ("wins", "ties", "losses", "n", "reward_candidate", "reward_baseline", "kl"):
            assert shows(rows[key]["value"], summary[key]), key
        assert shows(rows["length_candidate.mean"]["value"], summary["length_candidate"]["mean"])
    for later in ("Forgetting check", "Early stopping", "Intended use"):  # the rest of the card is intact
        assert f"\n## {later}\n" in body


def test_add_evaluation_leaves_a_folder_without_our_card_alone(tmp_path):
    (tmp_path / "README.md").write_text("# not ours\n")
    assert card.add_evaluation(tmp_path, eval_summary(0), "vs SFT") is None
    assert (tmp_path / "README.md").read_text() == "# not ours\n"
    assert not (tmp_path / "MODEL_CARD.md").exists()
