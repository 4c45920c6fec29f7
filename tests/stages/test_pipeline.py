"""align.pipeline end to end on tiny random models: all four stages and the evaluation in seconds, the wiring,
skip-on-rerun, resume of a failed stage, and a report whose numbers are the metrics files' numbers."""

import json
import os
import re
import shutil

import pytest

from align import losses, pipeline
from align.config import ConfigError, PipelineConfig, load_config
from align.formats import DataError

from helpers import ROOT

TINY_PIPELINE = "recipes/tiny/pipeline.yaml"


def make_config(out, *overrides) -> PipelineConfig:
    return load_config(PipelineConfig, TINY_PIPELINE, [f"output_dir={out}", "sft.overrides.log.progress=false",
                                                       "rm.overrides.log.progress=false",
                                                       "dpo.overrides.log.progress=false",
                                                       "ppo.overrides.log.progress=false", *overrides])


def reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of the tiny pipeline, shared by the tests that only read it or rerun it."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        reset_accelerate()
        summary = pipeline.main(make_config(out))
    finally:
        reset_accelerate()
        os.chdir(cwd)
    return out, summary


def metrics(folder, key):
    return [r[key] for r in map(json.loads, open(folder / "metrics.jsonl")) if key in r]


def test_all_four_stages_run_and_feed_each_other(finished):
    out, summary = finished
    for name in ("sft", "rm", "dpo", "ppo"):
        assert (out / name / "report.json").is_file(), name
    # SFT's model is where DPO and PPO start; the reward model is PPO's reward and (same tokenizer, causal) its critic.
    dpo_cfg = (out / "dpo" / "config.yaml").read_text()
    ppo_report = json.loads((out / "ppo" / "report.json").read_text())
    assert f"name_or_path: {out / 'sft' / 'model'}" in dpo_cfg
    assert f"model: {out / 'rm' / 'model'}" in (out / "ppo" / "config.yaml").read_text()
    assert ppo_report["critic_init"] == "reward"
    for name in ("dpo", "ppo"):
        ev = json.loads((out / f"eval_{name}" / "eval.json").read_text())
        assert ev["baseline"] == str(out / "sft" / "model") and ev["judge"] == str(out / "rm" / "model")
        assert ev["n"] == summary["evaluations"][name]["n"] > 0
    assert set(summary["evaluations"]) == {"dpo", "ppo"}


def test_the_safeguards_run_in_every_stage_and_the_report_shows_what_they_found(finished):
    """The chain's data audit, the forgetting check in each policy stage (on by default), model cards with the
    evaluation added, and the report's Safeguards section built from the stages' reports."""
    out, _ = finished
    pipeline_report = json.loads((out / "report.json").read_text())
    audit = json.loads((out / "audit.json").read_text())
    assert pipeline_report["audit"]["records"] == sum(s["records"] for s in audit["files"]) > 0
    report_md = (out / "report.md").read_text()
    for name in ("sft", "dpo", "ppo"):
        report = json.loads((out / name / "report.json").read_text())
        f = report["forgetting"]
        assert f["records"] == 32 and f["prompts"] == 16 and (out / name / "audit.md").is_file()
        line = next(x for x in report_md.splitlines() if x.startswith(f"- {name}: general-text loss"))
        assert f"rise {f['text_loss']['rise']:.4f}" in line and ("**flagged**" in line) == f["flagged"]
    assert "forgetting" not in json.loads((out / "rm" / "report.json").read_text())  # a classifier: no check
    for name in ("dpo", "ppo"):  # each policy's card has its win rate against the baseline
        card = (out / name / "model" / "README.md").read_text()
        ev = json.loads((out / f"eval_{name}" / "eval.json").read_text())
        assert card.startswith("---\n") and "Win rate against the baseline" in card
        assert f"| win_rate | {ev['win_rate']:.4g} |" in card
    rm_split = json.loads((out / "rm" / "report.json").read_text())["validation"]["length_bias"]
    from reward_models.metrics import length_carried

    assert (f"**Carried by length (rm):** {length_carried(rm_split)}" in report_md) == bool(length_carried(rm_split))


def test_report_files_exist_and_their_numbers_are_the_metrics_files_numbers(finished):
    out, _ = finished
    report_md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    for name in ("sft", "rm", "dpo", "ppo"):
        assert (out / f"curves_{name}.png").stat().st_size > 1000
        assert f"curves_{name}.png" in report_md
    for name in ("dpo", "ppo"):
        for plot in ("rewards.png", "kl_vs_reward.png", "lengths.png"):
            assert (out / f"eval_{name}" / plot).is_file() and f"eval_{name}/{plot}" in report_md
    # What every stage and evaluation computed in (the tests pin auto to fp32: tests/conftest.py), and why.
    used = [report["stages"][n]["report"]["precision"] for n in ("sft", "rm", "dpo", "ppo")]
    used += [report["evaluations"][n]["precision"] for n in ("dpo", "ppo")]
    assert used == [{"asked": "auto", "used": "fp32", "reason": "ALIGN_AUTO_PRECISION=fp32 in the environment"}] * 6
    assert ("Precision of sft, rm, dpo, ppo, eval dpo, eval ppo: fp32 (auto: ALIGN_AUTO_PRECISION=fp32 in the "
            "environment).") in report_md
    # Stage numbers: the last held-out values logged in each metrics.jsonl.
    sft_loss = metrics(out / "sft", "loss/val")
    assert report["stages"]["sft"]["report"]["val_loss"] == pytest.approx(sft_loss[-1])
    assert f"{sft_loss[0]:.4f} -> {sft_loss[-1]:.4f}" in report_md
    rm_acc = metrics(out / "rm", "accuracy/val")
    assert f"held-out pairwise accuracy {rm_acc[0]:.3f} -> {rm_acc[-1]:.3f}" in report_md
    dpo_acc = metrics(out / "dpo", "accuracy/val")
    assert f"held-out preference accuracy {dpo_acc[0]:.3f} -> {dpo_acc[-1]:.3f}" in report_md
    ppo_reward = metrics(out / "ppo", "reward/val")
    assert f"held-out reward {ppo_reward[0]:.4f} -> {ppo_reward[-1]:.4f}" in report_md
    # Evaluation numbers: eval.json, whose win rate is the per-prompt rows' win rate.
    for name in ("dpo", "ppo"):
        ev = json.loads((out / f"eval_{name}" / "eval.json").read_text())
        rows = [json.loads(line) for line in (out / f"eval_{name}" / "samples.jsonl").read_text().splitlines()]
        wins = sum(0.5 if r["candidate"] == r["baseline"] or r["reward_candidate"] == r["reward_baseline"] else
                   float(r["reward_candidate"] > r["reward_baseline"]) for r in rows)
        assert ev["win_rate"] == pytest.approx(wins / len(rows))
        lo, hi = ev["win_rate_ci95"]
        evaluation_table = report_md.split("## Policies against the baseline")[1]
        row = re.search(rf"^\| {name} \| (.*)$", evaluation_table, re.M).group(1)
        lc = "n/a" if ev["lc_win_rate"] is None else (f"{ev['lc_win_rate']:.3f} [{ev['lc_win_rate_ci95'][0]:.3f}, "
                                                      f"{ev['lc_win_rate_ci95'][1]:.3f}]")
        assert row.startswith(f"{ev['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {lc} |")
        assert f"| {ev['kl']:.3f} |" in row
        assert report["evaluations"][name]["win_rate"] == ev["win_rate"]


def test_rerun_skips_complete_stages_and_evaluations(finished, monkeypatch, capsys):
    out, summary = finished
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")}

    def must_not_run(name):
        raise AssertionError(f"stage {name} ran again")

    monkeypatch.setattr(pipeline, "stage_main", must_not_run)
    monkeypatch.setattr("align.evaluate.main", lambda *a, **k: pytest.fail("an evaluation ran again"))
    again = pipeline.main(make_config(out))
    logged = capsys.readouterr().out  # align logs to stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")} == before
    for i, name in enumerate(("sft", "rm", "dpo", "ppo"), 1):
        assert f"stage {i}/4 {name}: complete in {out / name}, skipped" in logged
    assert "evaluation of ppo: complete" in logged
    assert again["evaluations"] == summary["evaluations"] and again["stages"] == summary["stages"]


def test_a_complete_stage_with_changed_settings_is_an_error(finished):
    out, _ = finished
    with pytest.raises(ConfigError, match="stage dpo: .* holds a complete run made with other settings"):
        pipeline.main(make_config(out, "dpo.overrides.loss.beta=0.5"))


def test_a_failed_stage_resumes_from_its_own_checkpoint(tmp_path, finished, monkeypatch, capsys):
    """PPO fails in its 3rd iteration (after the checkpoint at 2); the rerun skips SFT, RM and DPO and resumes PPO,
    which then logs exactly the rows of the uninterrupted run."""
    out = tmp_path / "run"
    real_gae = losses.gae
    monkeypatch.setattr(losses, "gae", gae_failing_on_call(3))
    with pytest.raises(RuntimeError, match="injected failure"):
        pipeline.main(make_config(out, "ppo.overrides.train.save_every=2"))
    ledger = json.loads((out / "pipeline.json").read_text())
    assert ledger["stages"]["ppo"]["status"] == "failed" and "injected failure" in ledger["stages"]["ppo"]["error"]
    assert ledger["stages"]["dpo"]["status"] == "complete"
    assert not (out / "ppo" / "report.json").exists() and (out / "ppo" / "checkpoints" / "step-000002").is_dir()

    monkeypatch.setattr(losses, "gae", real_gae)
    ran = []
    real_stage_main = pipeline.stage_main
    monkeypatch.setattr(pipeline, "stage_main", lambda name: ran.append(name) or real_stage_main(name))
    capsys.readouterr()
    pipeline.main(make_config(out, "ppo.overrides.train.save_every=2"))
    logged = capsys.readouterr().out
    assert ran == ["ppo"]
    assert "stage 4/4 ppo: resuming the failed run" in logged and "(step 2)" in logged
    uninterrupted, _ = finished
    keep = lambda row: {k: v for k, v in row.items() if not k.startswith("perf/")}  # noqa: E731
    resumed_rows = [keep(json.loads(line)) for line in open(out / "ppo" / "metrics.jsonl")]
    reference_rows = [keep(json.loads(line)) for line in open(uninterrupted / "ppo" / "metrics.jsonl")]
    assert resumed_rows == reference_rows
    assert json.loads((out / "pipeline.json").read_text())["stages"]["ppo"]["status"] == "complete"


def gae_failing_on_call(n: int):
    """losses.gae that raises on its n-th call (PPO calls it once per iteration)."""
    real, calls = losses.gae, []

    def gae(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return gae


def test_a_failed_stage_with_changed_settings_is_not_resumed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(losses, "gae", gae_failing_on_call(2))  # after the checkpoint of iteration 1
        with pytest.raises(RuntimeError, match="injected failure"):
            pipeline.main(make_config(out, "ppo.overrides.train.save_every=1"))
    assert (out / "ppo" / "checkpoints" / "step-000001").is_dir()
    with pytest.raises(ConfigError, match="stage ppo: .* holds an unfinished run started with other settings"):
        pipeline.main(make_config(out, "ppo.overrides.train.save_every=1", "ppo.overrides.train.learning_rate=0.5"))
    # How often it checkpoints is not a setting that changes the result: the run resumes and finishes.
    pipeline.main(make_config(out, "ppo.overrides.train.save_every=2"))
    assert (out / "ppo" / "report.json").is_file()


def test_bad_pipeline_recipes_fail_before_any_stage_runs(tmp_path):
    with pytest.raises(ConfigError, match="rm feeds ppo, so it must come first"):
        make_config(tmp_path / "x", "stages=[sft,ppo,rm]")
    with pytest.raises(ConfigError, match="stages"):
        make_config(tmp_path / "x", "stages=[sft,reward]")
    with pytest.raises(ConfigError, match="settings for a stage that is not in stages"):
        make_config(tmp_path / "x", "stages=[sft,rm]")
    with pytest.raises(ConfigError, match="the pipeline sets it"):
        make_config(tmp_path / "x", "sft.overrides.output_dir=elsewhere")
    with pytest.raises(ConfigError, match=r"stage dpo \(recipes/tiny/dpo.yaml\): .*loss.beta"):
        pipeline.main(make_config(tmp_path / "x", "dpo.overrides.loss.beta=oops"))
    with pytest.raises(ConfigError, match=r"stage sft .*batch_size=8 is not a multiple of .* = 4 x 3"):
        pipeline.plan(make_config(tmp_path / "x"), "test", num_processes=3)
    with pytest.raises(ConfigError, match="save_merged=false: dpo and ppo start from SFT's merged model"):
        pipeline.plan(make_config(tmp_path / "x", "sft.overrides.lora.enabled=true",
                                  "sft.overrides.save_merged=false"), "test")
    with pytest.raises(DataError, match="evaluate.prompts: missing.jsonl: file not found"):
        pipeline.main(make_config(tmp_path / "x", "evaluate.prompts.path=missing.jsonl"))
    with pytest.raises(ConfigError, match="evaluate.policy: the pipeline sets it"):
        pipeline.main(make_config(tmp_path / "x", "evaluate.policy=somewhere"))
    assert not (tmp_path / "x").exists()  # nothing was written


def test_evaluation_prompts_that_overlap_training_records_are_flagged(tmp_path):
    cfg = make_config(tmp_path / "x", "evaluate.prompts.offset=50")  # the tiny RM and DPO read records 0-95
    assert pipeline.held_out_overlap(cfg.evaluate, pipeline.plan(cfg, "test")) == ["dpo", "rm"]
    cfg = make_config(tmp_path / "x")
    assert pipeline.held_out_overlap(cfg.evaluate, pipeline.plan(cfg, "test")) == []


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_run_the_pipeline_once(tmp_path, finished):
    """Under `accelerate launch` (two CPU processes over gloo) the stages split their batches, the evaluation deals
    its prompts out and gathers every one of them, and one process writes the ledger and the report."""
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "align.pipeline", TINY_PIPELINE, f"output_dir={out}", "ppo.overrides.log.progress=false",
           "ppo.overrides.train.micro_batch_size=4"]  # a minibatch of 8 splits into 2 processes x 4
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 processes" in done.stdout and done.stdout.count("report: ") == 1
    single, _ = finished
    for name in ("dpo", "ppo"):
        ev = json.loads((out / f"eval_{name}" / "eval.json").read_text())
        assert ev["n"] == json.loads((single / f"eval_{name}" / "eval.json").read_text())["n"]  # no prompt lost
    assert all(s["status"] == "complete" for s in json.loads((out / "pipeline.json").read_text())["stages"].values())


# ---- the user's files and changed inputs ----------------------------------------------------------------------

def test_a_folder_that_holds_no_pipeline_is_refused_untouched(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print('mine')")
    for overwrite in ("false", "true"):
        with pytest.raises(ConfigError, match="holds files that are not an align pipeline; choose a new or empty"):
            pipeline.main(make_config(folder, f"overwrite={overwrite}"))
        assert [p.name for p in folder.iterdir()] == ["train.py"]


def test_overwrite_clears_what_the_pipeline_wrote_and_keeps_the_users_files(tmp_path, finished):
    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    (out / "notes.md").write_text("mine")
    (out / "dpo" / "my_plot.png").write_bytes(b"png")
    pipeline.clear_folder(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".align.lock")
    assert left == ["dpo", "dpo/my_plot.png", "notes.md"]


def test_a_stages_data_rewritten_in_place_changes_its_fingerprint(tmp_path):
    data = tmp_path / "gsm.jsonl"
    shutil.copy(ROOT / "data" / "gsm8k_400.jsonl", data)
    cfg = make_config(tmp_path / "x", f"sft.overrides.data.train.path={data}")
    sft = pipeline.plan(cfg, "test")[0]
    before = pipeline.stage_fingerprint(sft)
    os.utime(data)  # touched, not changed: the same run
    assert pipeline.stage_fingerprint(sft) == before
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:2] + lines[:1] + lines[2:]))
    assert pipeline.stage_fingerprint(sft) != before


def test_a_ppo_recipe_reward_gives_way_to_the_reward_model_and_says_so(tmp_path, capsys):
    from align import train

    train.setup_logging(True)
    for reward, said in (("{rule: length, rule_args: {per_char: 0.01}}", "the recipe's reward (rule length) gives way"),
                         ("null", None)):
        recipe = tmp_path / "ppo_x.yaml"
        recipe.write_text((ROOT / "recipes" / "tiny" / "ppo.yaml").read_text().replace(
            "reward:\n  rule: length\n  rule_args:\n    per_char: 0.01\n", f"reward: {reward}\n"))
        capsys.readouterr()
        ppo = pipeline.plan(make_config(tmp_path / "x", f"ppo.recipe={recipe}"), "test")[-1]
        assert ppo.cfg.reward.model == str(tmp_path / "x" / "rm" / "model") and ppo.cfg.reward.rule is None
        logged = capsys.readouterr().out
        assert (said in logged) if said else "gives way" not in logged


# ---- grpo as a stage ------------------------------------------------------------------------------------------

def grpo_pipeline(tmp_path, stages: str, grpo_recipe: str = "recipes/tiny/grpo.yaml") -> str:
    recipe = tmp_path / "pipeline_grpo.yaml"
    recipe.write_text(re.sub(r"stages: .*\n", f"stages: {stages}\n", (ROOT / TINY_PIPELINE).read_text())
                      .replace("dpo:\n  recipe: recipes/tiny/dpo.yaml\n", "")
                      .replace("ppo:\n  recipe: recipes/tiny/ppo.yaml\n", f"grpo:\n  recipe: {grpo_recipe}\n")
                      .replace("rm:\n  recipe: recipes/tiny/rm.yaml\n",
                               "rm:\n  recipe: recipes/tiny/rm.yaml\n" if "rm" in stages else ""))
    return str(recipe)


def test_grpo_stage_starts_from_sft_keeps_its_rule_or_takes_the_rm_stage_model(tmp_path):
    recipe = grpo_pipeline(tmp_path, "[sft, rm, grpo]")
    grpo = pipeline.plan(load_config(PipelineConfig, recipe, [f"output_dir={tmp_path}"]), "t")[-1]
    assert grpo.name == "grpo" and grpo.inputs == ["sft"]
    assert grpo.cfg.model.name_or_path == str(tmp_path / "sft" / "model")
    assert grpo.cfg.reward.rule == "length" and grpo.cfg.reward.model is None  # its recipe's rule stays
    no_reward = tmp_path / "grpo_no_reward.yaml"
    no_reward.write_text((ROOT / "recipes" / "tiny" / "grpo.yaml").read_text().replace(
        "reward:\n  rule: length\n  rule_args:\n    per_char: 0.01\n", ""))
    recipe = grpo_pipeline(tmp_path, "[sft, rm, grpo]", str(no_reward))
    grpo = pipeline.plan(load_config(PipelineConfig, recipe, [f"output_dir={tmp_path}"]), "t")[-1]
    assert grpo.cfg.reward.model == str(tmp_path / "rm" / "model") and grpo.inputs == ["sft", "rm"]


def test_pipeline_runs_grpo_after_sft_and_evaluates_it_against_sft(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(PipelineConfig, grpo_pipeline(tmp_path, "[sft, grpo]"), [
        f"output_dir={out}", "grpo.overrides.train.max_steps=2", "grpo.overrides.log.progress=false",
        "sft.overrides.log.progress=false"])
    pipeline.main(cfg)
    report = json.loads((out / "grpo" / "report.json").read_text())
    assert report["stage"] == "grpo" and report["responses_per_prompt"] == 4
    judged = json.loads((out / "eval_grpo" / "eval.json").read_text())
    assert judged["policy"] == str(out / "grpo" / "model") and judged["baseline"] == str(out / "sft" / "model")
    assert (out / "curves_grpo.png").is_file()
    text = (out / "report.md").read_text()
    assert "Stages: sft -> grpo" in text and f"| grpo | {judged['win_rate']:.3f}" in text
